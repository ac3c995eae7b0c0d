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

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DRIVE_PAGE = """<html><body>Google Drive can't scan this file for viruses.
<form id="download-form" action="{base}/download" method="get">
<input type="hidden" name="id" value="FILEID"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1&amp;2">
</form></body></html>"""


class Handler(http.server.BaseHTTPRequestHandler):
  served = []  # (path, Range header, bytes sent)
  honour_range = True

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
