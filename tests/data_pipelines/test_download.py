"""Downloads against a local HTTP server: Range resume, md5, Drive confirm, offline."""

import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import zipfile

import pytest

from data_pipelines import download
from tests import paths

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DRIVE_PAGE = """<html><body>Google Drive can't scan this file for viruses.
<form id="download-form" action="{base}/download" method="get">
<input type="hidden" name="id" value="FILEID"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1&amp;2">
</form></body></html>"""


class Handler(http.server.BaseHTTPRequestHandler):
  served = []  # (path, Range header, bytes sent)
  honour_range = True
  files = {}  # path -> bytes, served as is

  def log_message(self, *args):
    pass

  def _send(self, body, status=200, kind="application/octet-stream", extra=None):
    self.send_response(status)
    self.send_header("Content-Type", kind)
    self.send_header("Content-Length", str(len(body)))
    for k, v in (extra or {}).items():
      self.send_header(k, v)
    self.end_headers()
    # Recorded before the body goes out: the client may finish reading (and the test
    # assert) before this server thread runs again.
    Handler.served.append((self.path, self.headers.get("Range"), len(body)))
    self.wfile.write(body)

  def do_GET(self):
    base = f"http://127.0.0.1:{self.server.server_port}"
    if self.path in Handler.files:
      return self._send(Handler.files[self.path])
    if self.path.startswith("/file"):
      rng = self.headers.get("Range")
      if rng and Handler.honour_range:
        start = int(rng.split("=")[1].rstrip("-"))
        if start >= len(PAYLOAD):
          self.send_response(416)
          self.end_headers()
          return
        return self._send(PAYLOAD[start:], 206)
      return self._send(PAYLOAD)
    if self.path.startswith("/uc"):
      return self._send(DRIVE_PAGE.format(base=base).encode(), kind="text/html")
    if self.path.startswith("/download?"):
      if "confirm=t" in self.path and "uuid=u-1%262" in self.path:
        return self._send(PAYLOAD)
      return self._send(b"bad token", 403)
    if self.path.endswith("-assembly1.cif.gz"):
      return self._send(b"cif")
    self.send_response(404)
    self.end_headers()


@pytest.fixture(scope="module")
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_port}"
  httpd.shutdown()


@pytest.fixture(autouse=True)
def reset():
  Handler.served.clear()
  Handler.honour_range = True
  Handler.files = {}


def test_fetch_and_md5(server, tmp_path):
  md5 = hashlib.md5(PAYLOAD).hexdigest()
  out = download.fetch(server + "/file", str(tmp_path / "a.bin"), md5=md5, progress=False)
  assert open(out, "rb").read() == PAYLOAD
  with pytest.raises(download.DownloadError, match="md5"):
    download.fetch(server + "/file", str(tmp_path / "b.bin"), md5="0" * 32, progress=False)
  assert not os.path.exists(tmp_path / "b.bin") and not os.path.exists(tmp_path / "b.bin.part")


def test_resume_with_range(server, tmp_path):
  dest = tmp_path / "c.bin"
  (tmp_path / "c.bin.part").write_bytes(PAYLOAD[:300_000])
  download.fetch(server + "/file", str(dest), progress=False)
  assert dest.read_bytes() == PAYLOAD
  assert Handler.served == [("/file", "bytes=300000-", len(PAYLOAD) - 300_000)]


def test_server_ignoring_range_restarts(server, tmp_path):
  Handler.honour_range = False
  (tmp_path / "d.bin.part").write_bytes(b"garbage" * 10)
  download.fetch(server + "/file", str(tmp_path / "d.bin"), progress=False)
  assert (tmp_path / "d.bin").read_bytes() == PAYLOAD


def test_complete_part_file_416(server, tmp_path):
  (tmp_path / "e.bin.part").write_bytes(PAYLOAD)
  download.fetch(server + "/file", str(tmp_path / "e.bin"), progress=False)
  assert (tmp_path / "e.bin").read_bytes() == PAYLOAD


def test_drive_confirm_flow(server, tmp_path):
  out = download.fetch_drive(server + "/uc?export=download&id=FILEID",
                             str(tmp_path / "ProtFunct.zip"), progress=False)
  assert open(out, "rb").read() == PAYLOAD
  assert [p.split("?")[0] for p, _, _ in Handler.served] == ["/uc", "/download"]


def test_drive_token_parsing_variants():
  base = "https://drive.google.com/uc?export=download&id=X"
  assert download.drive_url_with_confirm("", {"download_warning_1_X": "abc"}, "X",
                                         base) == base + "&confirm=abc"
  assert download.drive_url_with_confirm('<a href="/uc?confirm=Q1w_&id=X">', {}, "X",
                                         base) == base + "&confirm=Q1w_"
  assert download.drive_url_with_confirm("<html>quota exceeded</html>", {}, "X", base) is None


def _closed_port():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


def test_offline_message(tmp_path, capsys):
  url = f"http://127.0.0.1:{_closed_port()}/LBA.tar.gz"
  with pytest.raises(download.DownloadError, match="cannot reach 127.0.0.1.*offline.*place it at"):
    download.fetch(url, str(tmp_path / "x.tar.gz"), timeout=2, progress=False)
  # The CLI turns it into exit code 2 and one clear line, for a real task's URL.
  download.ARCHIVES["mqa"], saved = [("PSR.tar.gz", url, None)], download.ARCHIVES["mqa"]
  try:
    assert download.main(["mqa", "--out", str(tmp_path), "--timeout", "2"]) == 2
  finally:
    download.ARCHIVES["mqa"] = saved
  assert "download failed: cannot reach" in capsys.readouterr().err


def test_unpack_refuses_escaping_members(tmp_path):
  good = tmp_path / "good.tar.gz"
  with tarfile.open(good, "w:gz") as tar:
    info = tarfile.TarInfo("split-by-year/data/train/data.mdb")
    info.size = 3
    tar.addfile(info, io.BytesIO(b"abc"))
  download.unpack(str(good), str(tmp_path / "out"))
  assert (tmp_path / "out/split-by-year/data/train/data.mdb").read_bytes() == b"abc"
  bad = tmp_path / "bad.zip"
  with zipfile.ZipFile(bad, "w") as z:
    z.writestr("../evil.txt", "x")
  with pytest.raises(download.DownloadError, match="refusing"):
    download.unpack(str(bad), str(tmp_path / "out2"))
  assert not (tmp_path / "evil.txt").exists()


def test_scannet_structure_urls_and_fallback(server, tmp_path):
  assert download.structure_candidates("1A2N", biounit=True)[0] == (
      "1a2n.pdb1.gz", "https://files.wwpdb.org/pub/pdb/data/biounit/PDB/divided/a2/1a2n.pdb1.gz")
  wwpdb = "https://files.wwpdb.org/pub/pdb/data/structures/divided"
  assert download.structure_candidates("7e33", biounit=False) == [
      ("7e33.cif.gz", f"{wwpdb}/mmCIF/e3/7e33.cif.gz"),
      ("pdb7e33.ent.gz", f"{wwpdb}/pdb/e3/pdb7e33.ent.gz")]
  (tmp_path / "labels.txt").write_text(">1a2n_0-A\nA 1 M 0\n>7E33_AB\nA 1 M 1\n")
  assert download.pdb_ids_in_label_files([str(tmp_path / "labels.txt")]) == ["1a2n", "7e33"]
  candidates = [(n, server + "/" + n) for n in ("1a2n.pdb1.gz", "1a2n-assembly1.cif.gz")]
  out = download.fetch_structure("1a2n", str(tmp_path / "s"), True, candidates=candidates)
  assert out.endswith("1a2n-assembly1.cif.gz") and open(out, "rb").read() == b"cif"


# The five ProtFunct text files, small stand-ins with their own md5s and line counts.
_LABEL_TEXT = {"chain_functions.txt": "1abc.A,0\n2def.B,1\n", "unique_functions.txt":
               "1.1.1.1\n2.2.2.2\n", "training.txt": "1abc.A\n",
               "validation.txt": "2def.B\n", "testing.txt": "3ghi.C\n4jkl.D\n"}


def _protfunct_zip(path, with_labels=False):
  """A Drive-like ProtFunct.zip: ProtFunct/data/*.hdf5, the text files only if asked."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("ProtFunct/data/1abc.A.hdf5", b"\x89HDF")
    if with_labels:
      for name, text in _LABEL_TEXT.items():
        z.writestr(f"ProtFunct/{name}", text)


@pytest.fixture
def label_files(server, monkeypatch):
  monkeypatch.setattr(download, "IECONV_RAW", server + "/ieconv/{name}")
  monkeypatch.setattr(download, "REACT_LABEL_FILES", {
      name: download.LabelFile(text.count("\n"), hashlib.md5(text.encode()).hexdigest())
      for name, text in _LABEL_TEXT.items()})
  for name, text in _LABEL_TEXT.items():
    Handler.files[f"/ieconv/{name}"] = text.encode()


def test_react_label_files_fetched_when_the_archive_lacks_them(server, tmp_path,
                                                              monkeypatch, label_files):
  _protfunct_zip(tmp_path / "ProtFunct.zip")
  Handler.files["/ProtFunct.zip"] = (tmp_path / "ProtFunct.zip").read_bytes()
  monkeypatch.setitem(download.ARCHIVES, "react",
                      [("ProtFunct.zip", server + "/ProtFunct.zip", None)])
  out = tmp_path / "raw"
  download.download("react", str(out))
  for name, text in _LABEL_TEXT.items():  # beside data/, where react.find_root looks
    assert (out / "ProtFunct" / name).read_text() == text
  from data_pipelines import react
  assert react.find_root(str(out)) == str(out / "ProtFunct")


def test_react_label_files_checked(server, tmp_path, label_files):
  (tmp_path / "a").mkdir()
  download.unpack(str(_zip_at(tmp_path / "a.zip")), str(tmp_path / "a"))
  Handler.files["/ieconv/testing.txt"] = b"3ghi.C\n"  # not IEConv's file
  with pytest.raises(download.DownloadError, match="testing.txt.*md5"):
    download.react_label_files(str(tmp_path / "a"))
  # A copy in the archive with a line missing is refused, naming the file.
  _protfunct_zip(tmp_path / "b.zip", with_labels=True)
  download.unpack(str(tmp_path / "b.zip"), str(tmp_path / "b"))
  (tmp_path / "b" / "ProtFunct" / "training.txt").write_text("")
  with pytest.raises(download.DownloadError, match="training.txt: 0 lines, expected 1"):
    download.react_label_files(str(tmp_path / "b"))


def _zip_at(path):
  _protfunct_zip(path)
  return path


def test_python_requires_allows_tarfile_data_filter():
  """unpack uses tarfile's filter="data", new in Python 3.11.4 (and 3.10.12, 3.9.17)."""
  import configparser
  from packaging.specifiers import SpecifierSet
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(paths.REPO, "setup.cfg"))
  allowed = SpecifierSet(cfg["options"]["python_requires"])
  assert "3.11.4" in allowed and "3.12.0" in allowed
  assert "3.11.3" not in allowed and "3.11.0" not in allowed
  assert hasattr(tarfile, "data_filter")
