"""Downloads each benchmark's official files (docs/tasks.md) and unpacks them.

  python -m data_pipelines.download <lba30|lba60|mqa|react|ppbs|bce> --out DIR

Archives (Zenodo, Google Drive) resume with HTTP Range requests and are md5-checked;
react's five label files come from IEConv's repository when the archive lacks them;
PPBS / BCE fetch ScanNet's label files, then one wwPDB structure per PDB id into
`DIR/structures/` (re-runs resume; failures in `failed.txt`). Without network access
every function raises `DownloadError` naming the host and where to place the file by
hand. Details: docs/tasks.md, "Raw inputs". Public: download, fetch, fetch_drive,
drive_url_with_confirm, unpack, fetch_structures, react_label_files, DownloadError.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import html
import http.cookiejar
import os
import re
import shutil
import socket
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

ZENODO = "https://zenodo.org/record/{record}/files/{name}?download=1"
DRIVE_URL = "https://drive.google.com/uc?export=download&id={id}"
SCANNET_RAW = "https://raw.githubusercontent.com/jertubiana/ScanNet/main/datasets/{task}/{name}"
IECONV_RAW = ("https://raw.githubusercontent.com/phermosilla/IEConv_proteins/master/"
              "Datasets/data/ProtFunct/{name}")
WWPDB = "https://files.wwpdb.org/pub/pdb/data"
PPBS_STRUCTURE_URLS = (
    ("{id}.pdb1.gz", WWPDB + "/biounit/PDB/divided/{xy}/{id}.pdb1.gz"),
    ("{id}-assembly1.cif.gz", WWPDB + "/assemblies/mmCIF/divided/{xy}/{id}-assembly1.cif.gz"),
)
BCE_STRUCTURE_URLS = (
    ("{id}.cif.gz", WWPDB + "/structures/divided/mmCIF/{xy}/{id}.cif.gz"),
    ("pdb{id}.ent.gz", WWPDB + "/structures/divided/pdb/{xy}/pdb{id}.ent.gz"),
)

# (file name, URL, md5 or None) per task.
ARCHIVES = {
    "lba30": [("LBA-split-by-sequence-identity-30.tar.gz",
               ZENODO.format(record=4914718, name="LBA-split-by-sequence-identity-30.tar.gz"),
               None)],
    "lba60": [("LBA-split-by-sequence-identity-60.tar.gz",
               ZENODO.format(record=4914718, name="LBA-split-by-sequence-identity-60.tar.gz"),
               None)],
    "mqa": [("PSR-split-by-year.tar.gz",
             ZENODO.format(record=4915648, name="PSR-split-by-year.tar.gz"),
             "8647b9d10d0a79dff81d1d83c825e74c")],  # md5 checked by ESM-GearNet's loader
    "react": [("ProtFunct.zip", DRIVE_URL.format(id="1udP6_90WYkwkvL1LwqIAzf9ibegBJ8rI"),
               None)],
}
SCANNET_FILES = {
    "ppbs": ["table.csv", "labels_train.txt"] + [
        f"labels_{s}_{k}.txt" for s in ("validation", "test")
        for k in ("70", "homology", "topology", "none")],
    "bce": ["table.csv"] + [f"labels_fold{k}.txt" for k in range(1, 6)],
}
TASKS = sorted(set(ARCHIVES) | set(SCANNET_FILES))

LabelFile = collections.namedtuple("LabelFile", "lines md5")
# IEConv's ProtFunct text files (repository phermosilla/IEConv_proteins, branch master):
# non-empty lines and md5, as committed there; the split files' line counts are the
# split sizes the literature reports.
REACT_LABEL_FILES = {
    "chain_functions.txt": LabelFile(37428, "436b1098766a2643fdd9df80b5239989"),
    "unique_functions.txt": LabelFile(384, "9f2ca83737fb67dceede5821319cecdf"),
    "training.txt": LabelFile(29215, "43efda21dd8757fb896ff86da7cb7b00"),
    "validation.txt": LabelFile(2562, "acebf12f48b0f5668529027ddab99c46"),
    "testing.txt": LabelFile(5651, "9156907fabe55585e8ec2b3635f21b08"),
}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
  """A download failed; the message says why and what to do."""


def _offline_message(url: str, err: Exception, dest: str) -> str:
  host = urllib.parse.urlparse(url).netloc
  return (f"cannot reach {host} ({type(err).__name__}: {err}). This machine seems to be "
          f"offline or the host is blocked. Download {url} on a connected machine and "
          f"place it at {dest}, then re-run the same command (it resumes and unpacks).")


def _open(url: str, *, headers=None, timeout: float, opener=None, dest: str = ""):
  request = urllib.request.Request(url, headers={"User-Agent": "bihier_jax-download",
                                                 **(headers or {})})
  try:
    return (opener or urllib.request.build_opener()).open(request, timeout=timeout)
  except urllib.error.HTTPError:
    raise
  except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
    raise DownloadError(_offline_message(url, e, dest)) from e


def md5sum(path: str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def fetch(url: str, dest: str, *, md5: str | None = None, timeout: float = 60.0,
          opener=None, progress: bool = True) -> str:
  """Downloads `url` to `dest`, resuming `dest.part` with a Range request.

  A server that ignores Range (200 instead of 206) restarts the file from zero; 416
  means the part file is already complete. The md5, when given, is checked before the
  part file becomes `dest` (a mismatch deletes it). Returns `dest`.
  """
  if os.path.exists(dest):
    return dest
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  part = dest + ".part"
  have = os.path.getsize(part) if os.path.exists(part) else 0
  headers = {"Range": f"bytes={have}-"} if have else {}
  try:
    response = _open(url, headers=headers, timeout=timeout, opener=opener, dest=dest)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:
      response = None  # nothing left to fetch
    else:
      raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
  if response is not None:
    with response:
      append = have and response.status == 206
      total = response.headers.get("Content-Length")
      total = int(total) + (have if append else 0) if total else None
      done = have if append else 0
      bar = _progress(progress, total, done, os.path.basename(dest))
      try:
        with open(part, "ab" if append else "wb") as f:
          while True:
            try:
              block = response.read(CHUNK)
            except (socket.timeout, ConnectionError, TimeoutError) as e:
              raise DownloadError(
                  f"{url}: connection lost after {done} bytes ({e}); re-run to resume "
                  f"from {part}") from e
            if not block:
              break
            f.write(block)
            done += len(block)
            if bar is not None:
              bar.update(len(block))
      finally:
        if bar is not None:
          bar.close()
      if total is not None and done < total:
        raise DownloadError(f"{url}: got {done} of {total} bytes; re-run to resume")
  if md5 is not None:
    got = md5sum(part)
    if got != md5:
      os.remove(part)
      raise DownloadError(f"{url}: md5 {got} != expected {md5}; the partial file was "
                          "deleted, re-run to download again")
  os.replace(part, dest)
  return dest


def _progress(enabled: bool, total, initial: int, name: str):
  if not enabled:
    return None
  try:
    import tqdm
  except ImportError:
    return None
  return tqdm.tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name)


# --- Google Drive ----------------------------------------------------------------------

def drive_url_with_confirm(page: str, cookies: dict[str, str], file_id: str,
                           base_url: str) -> str | None:
  """The URL that actually serves a large Drive file, from the warning page.

  Newer pages hold a form (`action=".../download"`) with hidden `id`, `confirm`, `uuid`
  inputs; older ones set a `download_warning_*` cookie or embed `confirm=XYZ` in a link.
  Returns None when `page` carries no token (e.g. an error or quota page).
  """
  form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"', page)
  inputs = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page))
  if form and "confirm" in inputs:
    params = {k: html.unescape(v) for k, v in inputs.items()}
    params.setdefault("id", file_id)
    return html.unescape(form.group(1)) + "?" + urllib.parse.urlencode(params)
  token = next((v for k, v in cookies.items() if k.startswith("download_warning")), None)
  if token is None:
    m = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    token = m.group(1) if m else None
  if token is None:
    return None
  return base_url + ("&" if "?" in base_url else "?") + f"confirm={token}"


def fetch_drive(url: str, dest: str, *, timeout: float = 60.0, progress: bool = True) -> str:
  """Google Drive download with the confirm-token step for large files."""
  if os.path.exists(dest):
    return dest
  jar = http.cookiejar.CookieJar()
  opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
  file_id = urllib.parse.parse_qs(urllib.parse.urlparse(url).query).get("id", [""])[0]
  if not os.path.exists(dest + ".part"):  # a part file means we already know the URL
    try:
      response = _open(url, timeout=timeout, opener=opener, dest=dest)
    except urllib.error.HTTPError as e:
      raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    with response:
      kind = response.headers.get("Content-Type", "")
      if "text/html" not in kind:  # small file: served directly
        with open(dest + ".part", "wb") as f:
          shutil.copyfileobj(response, f, CHUNK)
        os.replace(dest + ".part", dest)
        return dest
      page = response.read().decode("utf-8", errors="replace")
    cookies = {c.name: c.value for c in jar}
    confirmed = drive_url_with_confirm(page, cookies, file_id, url)
    if confirmed is None:
      raise DownloadError(f"{url}: Google Drive sent a page without a download token "
                          "(quota exceeded or file moved); download it in a browser and "
                          f"place it at {dest}")
    with open(dest + ".url", "w") as f:
      f.write(confirmed)
  with open(dest + ".url") as f:
    confirmed = f.read().strip()
  out = fetch(confirmed, dest, timeout=timeout, opener=opener, progress=progress)
  os.remove(dest + ".url")
  return out


# --- unpacking -------------------------------------------------------------------------

def _inside(root: str, name: str) -> bool:
  target = os.path.realpath(os.path.join(root, name))
  return os.path.commonpath([os.path.realpath(root), target]) == os.path.realpath(root)


def unpack(archive: str, out_dir: str) -> None:
  """Extracts a .tar.gz / .tgz / .zip into `out_dir`, refusing members outside it."""
  os.makedirs(out_dir, exist_ok=True)
  marker = archive + ".unpacked"
  if os.path.exists(marker):
    return
  if archive.endswith((".tar.gz", ".tgz", ".tar")):
    with tarfile.open(archive) as tar:
      for member in tar.getmembers():
        if not _inside(out_dir, member.name) or member.issym() or member.islnk():
          raise DownloadError(f"{archive}: refusing member {member.name!r} (link or "
                              "path outside the output folder)")
      tar.extractall(out_dir, filter="data")
  elif archive.endswith(".zip"):
    with zipfile.ZipFile(archive) as z:
      for name in z.namelist():
        if not _inside(out_dir, name):
          raise DownloadError(f"{archive}: refusing member {name!r} (outside the output "
                              "folder)")
      z.extractall(out_dir)
  else:
    raise DownloadError(f"{archive}: unknown archive type")
  open(marker, "w").close()


# --- ScanNet structures ----------------------------------------------------------------

def pdb_ids_in_label_files(paths) -> list[str]:
  """Sorted lowercase PDB ids named by the headers of ScanNet label files."""
  ids = set()
  for path in paths:
    with open(path) as f:
      for line in f:
        if line.startswith(">"):
          ids.add(line[1:5].lower())
  return sorted(ids)


def structure_candidates(pdb_id: str, biounit: bool) -> list[tuple[str, str]]:
  """[(file name, URL)] to try in order for one PDB id."""
  pdb_id = pdb_id.lower()
  table = PPBS_STRUCTURE_URLS if biounit else BCE_STRUCTURE_URLS
  return [(name.format(id=pdb_id), url.format(id=pdb_id, xy=pdb_id[1:3]))
          for name, url in table]


def fetch_structure(pdb_id: str, out_dir: str, biounit: bool, *, timeout: float = 60.0,
                    candidates=None) -> str:
  """The first available structure file of `pdb_id` (kept if already there)."""
  candidates = candidates or structure_candidates(pdb_id, biounit)
  for name, _ in candidates:
    if os.path.exists(os.path.join(out_dir, name)):
      return os.path.join(out_dir, name)
  errors = []
  for name, url in candidates:
    try:
      return fetch(url, os.path.join(out_dir, name), timeout=timeout, progress=False)
    except DownloadError as e:
      if "cannot reach" in str(e):
        raise
      errors.append(str(e))
  raise DownloadError(f"{pdb_id}: no structure file ({'; '.join(errors)})")


def fetch_structures(pdb_ids, out_dir: str, biounit: bool, *, workers: int = 8,
                     timeout: float = 60.0) -> list[str]:
  """Fetches every id in parallel; returns (and writes to failed.txt) the failures."""
  os.makedirs(out_dir, exist_ok=True)
  failed = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {pool.submit(fetch_structure, i, out_dir, biounit, timeout=timeout): i
               for i in pdb_ids}
    bar = _progress(True, len(futures), 0, "structures")
    for future in concurrent.futures.as_completed(futures):
      try:
        future.result()
      except DownloadError as e:
        if "cannot reach" in str(e):
          pool.shutdown(cancel_futures=True)
          raise
        failed.append(f"{futures[future]}\t{e}")
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
  with open(os.path.join(out_dir, "failed.txt"), "w") as f:
    f.write("".join(line + "\n" for line in sorted(failed)))
  return failed


# --- react label files -----------------------------------------------------------------

def _protfunct_root(out_dir: str) -> str:
  """The folder of the ProtFunct text files: where chain_functions.txt is, else the one
  holding the `data/` folder of HDF5 files, else `out_dir/ProtFunct`."""
  for root, dirs, files in os.walk(out_dir):
    if "chain_functions.txt" in files:
      return root
  for root, dirs, _ in os.walk(out_dir):
    if "data" in dirs and any(f.endswith(".hdf5")
                              for f in os.listdir(os.path.join(root, "data"))):
      return root
  return os.path.join(out_dir, "ProtFunct")


def _count_lines(path: str) -> int:
  with open(path, "rb") as f:
    return sum(1 for line in f if line.strip())


def react_label_files(out_dir: str, *, timeout: float = 60.0) -> str:
  """Makes sure the five ProtFunct text files sit beside the HDF5 `data/` folder.

  Missing ones are fetched from IEConv's repository (md5 checked); every file's line
  count must be the published one. Returns the folder.
  """
  root = _protfunct_root(out_dir)
  for name, facts in REACT_LABEL_FILES.items():
    path = os.path.join(root, name)
    if os.path.exists(path):
      got = md5sum(path)
      if got != facts.md5:
        print(f"note: {path} (from the archive) has md5 {got}, IEConv's repository "
              f"has {facts.md5}; its line count is checked instead", file=sys.stderr)
    else:
      fetch(IECONV_RAW.format(name=name), path, md5=facts.md5, timeout=timeout,
            progress=False)
    lines = _count_lines(path)
    if lines != facts.lines:
      raise DownloadError(f"{path}: {lines} lines, expected {facts.lines} (IEConv's "
                          f"ProtFunct/{name}); delete it and re-run to fetch "
                          "IEConv's copy")
  return root


# --- per task --------------------------------------------------------------------------

def download(task: str, out_dir: str, *, timeout: float = 60.0, workers: int = 8,
             skip_structures: bool = False) -> None:
  if task in ARCHIVES:
    for name, url, md5 in ARCHIVES[task]:
      dest = os.path.join(out_dir, name)
      if "drive.google.com" in url:
        fetch_drive(url, dest, timeout=timeout)
      else:
        fetch(url, dest, md5=md5, timeout=timeout)
      unpack(dest, out_dir)
    if task == "react":
      react_label_files(out_dir, timeout=timeout)
    return
  if task not in SCANNET_FILES:
    raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
  folder = task.upper()
  paths = [fetch(SCANNET_RAW.format(task=folder, name=n), os.path.join(out_dir, n),
                 timeout=timeout) for n in SCANNET_FILES[task]]
  if skip_structures:
    return
  ids = pdb_ids_in_label_files([p for p in paths if p.endswith(".txt")])
  failed = fetch_structures(ids, os.path.join(out_dir, "structures"), task == "ppbs",
                            workers=workers, timeout=timeout)
  print(f"{len(ids) - len(failed)}/{len(ids)} structures in {out_dir}/structures"
        + (f"; failures in {out_dir}/structures/failed.txt" if failed else ""))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.download",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("task", choices=TASKS)
  parser.add_argument("--out", required=True, help="raw data directory")
  parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
  parser.add_argument("--workers", type=int, default=8, help="parallel structure downloads")
  parser.add_argument("--skip-structures", action="store_true",
                      help="PPBS/BCE: label files only")
  args = parser.parse_args(argv)
  try:
    download(args.task, args.out, timeout=args.timeout, workers=args.workers,
             skip_structures=args.skip_structures)
  except DownloadError as e:
    print(f"download failed: {e}", file=sys.stderr)
    return 2
  print(f"{args.task}: ready in {args.out}; next: python -m data_pipelines.preprocess "
        f"{args.task} --raw {args.out} --out PREPARED")
  return 0


if __name__ == "__main__":
  sys.exit(main())
