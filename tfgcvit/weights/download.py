"""Downloading checkpoints into a local cache, safely.

The cache directory is `$TFGCVIT_HOME` when set, else `~/.cache/tfgcvit`.
Downloads go to `<cache>/checkpoints/`. A file only appears there once it is
complete and its sha256 checked: it is written to a temporary file in the same
directory and moved into place with `os.replace`, which is atomic, so an
interrupted, truncated or corrupted download never leaves a file that a later
run would trust. Next to each file, `<name>.sha256` records its digest; later
uses check the file against it.

`TFGCVIT_MIRROR` replaces the official host for the official checkpoints: set
it to a base URL (`https://mirror.example/gcvit/`) or a local directory that
holds files with the official names. Hashes still apply.
"""

import contextlib
import hashlib
import http.client
import os
import secrets
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

try:  # Locking is an optimisation (one download instead of two); os.replace keeps it safe without.
    import fcntl
except ImportError:  # Windows
    fcntl = None

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "tfgcvit")
USER_AGENT = "tfgcvit (+https://github.com/NVlabs/GCVit weights converter)"
_CHUNK_BYTES = 1024 * 1024
_TIMEOUT_SECONDS = 60
_PROGRESS_INTERVAL_SECONDS = 0.25
_HASH_CHUNK_BYTES = 8 * 1024 * 1024

# Files whose unpinned digest was already announced in this process (say it once).
_ANNOUNCED = set()
# What an interrupt removes: temporaries of `replaced_atomically`, lock files beside a user's files.
_PENDING = set()


class DownloadError(OSError):
    """A file could not be downloaded, or what arrived is not what was expected."""


def cache_dir():
    """The tfgcvit cache directory: `$TFGCVIT_HOME`, else `~/.cache/tfgcvit`."""
    return os.path.abspath(os.path.expanduser(os.environ.get("TFGCVIT_HOME") or DEFAULT_CACHE_DIR))


def checkpoints_dir():
    """Where downloaded checkpoints are kept: `<cache>/checkpoints`."""
    return os.path.join(cache_dir(), "checkpoints")


def file_sha256(path):
    """The hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mirrored(url):
    """`url` with its host replaced by `$TFGCVIT_MIRROR` when that is set.

    Args:
        url: an official download URL.

    Returns:
        The URL itself without a mirror; `<mirror>/<file name>` for a mirror
        URL; a local path `<mirror>/<file name>` for a mirror directory.
    """
    mirror = os.environ.get("TFGCVIT_MIRROR", "").strip()
    if not mirror:
        return url
    name = _url_file_name(url)
    if mirror.startswith(("http://", "https://", "file://")):
        return mirror.rstrip("/") + "/" + urllib.parse.quote(name)
    return os.path.join(os.path.expanduser(mirror), name)


def _url_file_name(url):
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    return name


def _safe_file_name(name, url):
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(
            f"Cannot derive a file name from {url!r}; pass filename='name.pth.tar' to fetch()."
        )
    return name


def _hint(url, filename):
    return (
        f"The cache directory is {cache_dir()} (set TFGCVIT_HOME to change it). Without "
        f"network access, download {url} elsewhere and pass its path, e.g. "
        f"weights='/path/to/{filename}', or set TFGCVIT_MIRROR to a server URL or a "
        "local directory holding the file."
    )


def _sidecar_path(path):
    return path + ".sha256"


def recorded_sha256(path):
    """The digest recorded next to a downloaded file (`<path>.sha256`), or None."""
    try:
        with open(_sidecar_path(path), encoding="utf-8") as file:
            digest = file.read().split()[0].lower()
    except (OSError, IndexError):
        return None
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


@contextlib.contextmanager
def replaced_atomically(destination, suffix=".part", folder=False):
    """A temporary file (or folder) next to `destination` that becomes it when the block succeeds.

    The file is created with mode 0666 less the umask, like any new file (not
    0600 as `tempfile.mkstemp` would), so a shared `TFGCVIT_HOME` stays
    readable by others. `os.replace` moves it into place atomically; if the
    block fails, or the command line is interrupted (`remove_pending_files`),
    it is removed: a destination is never half written.

    Args:
        destination: the final path.
        suffix: ending of the temporary name (".weights.h5" where Keras wants one).
        folder: make the temporary an empty folder (a SavedModel). A folder
            already at `destination` is replaced whole: it is moved aside, the
            new one moved in, then the old one deleted (callers decide whether
            it may be).

    Yields:
        The temporary path, an empty file or folder, to write.
    """
    directory, name = os.path.split(os.path.abspath(destination))
    while True:
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}{suffix}")
        # Pending before it exists: an interrupt just after its creation removes it too.
        _PENDING.add(temporary)
        try:
            if folder:
                os.mkdir(temporary, 0o777)
            else:
                os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            _PENDING.discard(temporary)
        except BaseException:
            _PENDING.discard(temporary)
            raise
    try:
        yield temporary
        if folder and os.path.isdir(destination):
            # os.replace cannot replace a folder that holds files. The old folder is
            # never in _PENDING: an interrupt between the two moves leaves it aside, whole.
            old = temporary + ".old"
            os.replace(destination, old)
            try:
                os.replace(temporary, destination)
            except BaseException:
                os.replace(old, destination)
                raise
            _remove_quietly(old)
        else:
            os.replace(temporary, destination)
    except BaseException:
        _remove_quietly(temporary)
        raise
    finally:
        _PENDING.discard(temporary)


def weights_file_bytes(variables):
    """About how many bytes (at most) a Keras `.weights.h5` file of `variables` takes on disk.

    Measured: besides the values, 2.5 to 2.8 KB of HDF5 structure per variable
    (GC ViT fixture, xxtiny and tiny); a 4 KiB page more per file for the file system.
    """
    import numpy as np

    values = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    return values + 4096 * len(variables) + 65536


def check_free_space(destination, needed, what=None):
    """Raises OSError unless the file system of `destination` has `needed` bytes free.

    Weights are written with h5py, which cannot fail cleanly on a full disk:
    HDF5 (1.14) prints hundreds of lines, then crashes the process (SIGSEGV in
    `H5D_close`, when Python frees the dataset whose write failed).

    Args:
        destination: the path to write (it need not exist yet).
        needed: bytes it will take.
        what: how to name it in the message (default: the path).
    """
    folder = os.path.dirname(os.path.abspath(destination))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            f"cannot write {what or destination}: not enough space on the device ({needed / 1e6:.1f} MB "
            f"needed, {free / 1e6:.1f} MB free in {folder}); free some space or choose another place"
        )


def remove_pending_files():
    """Removes the temporary files and folders of unfinished `replaced_atomically` blocks (on an interrupt)."""
    for temporary in list(_PENDING):
        _remove_quietly(temporary)


def _write_atomically(path, text):
    with replaced_atomically(path, suffix=".txt") as temporary, open(temporary, "w", encoding="utf-8") as file:
        file.write(text)


def _write_sidecar(path, digest):
    _write_atomically(_sidecar_path(path), f"{digest}  {os.path.basename(path)}\n")


def _remove_quietly(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass


class FileLock:
    """An exclusive lock on `<path>.lock` (fcntl), so concurrent fetches download once.

    Args:
        path: what the lock guards; the lock file is `<path>.lock`.
        remove: remove the lock file when the lock is released (or the command line is
            interrupted), for locks beside a user's files; by default it stays, as in the cache.
    """

    def __init__(self, path, remove=False):
        self.path = path + ".lock"
        self.remove = remove
        self.file = None

    def __enter__(self):
        if fcntl is None:
            return self
        while True:
            file = open(self.path, "a+b")
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            # A holder may have removed the file before releasing it: then this lock guards
            # nothing, and the next try locks the file now at the path.
            try:
                if os.path.samestat(os.fstat(file.fileno()), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            file.close()
        self.file = file
        if self.remove:
            _PENDING.add(self.path)
        return self

    def __exit__(self, *exc_info):
        if self.file is not None:
            if self.remove:
                _remove_quietly(self.path)  # removed while held, so no one locks a stale file
                _PENDING.discard(self.path)
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def _progress_enabled(progress):
    stream = sys.stderr
    return bool(progress) and hasattr(stream, "isatty") and stream.isatty()


def _check_digest(path, expected, what):
    actual = file_sha256(path)
    if expected is not None and actual != expected:
        raise DownloadError(
            f"{what} has sha256 {actual}, expected {expected}: the file is corrupted or "
            "is not the published one."
        )
    return actual


def _verified_cached_file(path, sha256):
    """`path` if it exists and matches its pinned or recorded digest, else None (and it is removed)."""
    if not os.path.isfile(path):
        return None
    expected = sha256 or recorded_sha256(path)
    actual = file_sha256(path)
    if expected is None:
        # A file put there by hand: trust it, and check it from now on.
        _write_sidecar(path, actual)
        return path
    if actual == expected:
        return path
    sys.stderr.write(
        f"tfgcvit: cached {path} has sha256 {actual}, expected {expected}; "
        "deleting it and downloading again.\n"
    )
    _remove_quietly(path)
    _remove_quietly(_sidecar_path(path))
    return None


def _download(url, destination, sha256, progress):
    """Downloads `url` to `destination` atomically; returns the sha256 of what arrived."""
    name = os.path.basename(destination)
    with replaced_atomically(destination) as temporary:
        digest = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with open(temporary, "wb") as output, \
                urllib.request.urlopen(request, timeout=_TIMEOUT_SECONDS) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(total=total, desc=f"Downloading {name}", unit="B", unit_scale=True,
                      file=sys.stderr, disable=not _progress_enabled(progress),
                      mininterval=_PROGRESS_INTERVAL_SECONDS) as display:
                while True:
                    chunk = response.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                    output.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    display.update(len(chunk))
            if total is not None and received != total:
                raise DownloadError(
                    f"The download of {url} is truncated: {received} of {total} bytes arrived."
                )
            output.flush()
            os.fsync(output.fileno())
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise DownloadError(
                f"The file downloaded from {url} has sha256 {actual}, expected {sha256}: "
                "it was corrupted in transit or the server sent another file. Nothing was "
                "kept; try again."
            )
        _write_sidecar(destination, actual)  # First, so the file never exists without it.
    return actual


def _describe(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP error {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"cannot reach the server ({error.reason})"
    if isinstance(error, http.client.IncompleteRead):
        return f"the connection closed early ({len(error.partial)} bytes in the last read)"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "the connection timed out"
    return f"{type(error).__name__}: {error}"


def _fetch_local(path, sha256):
    """A mirror directory or file:// source: check it in place, no copy."""
    if not os.path.isfile(path):
        name = os.path.basename(path)
        raise DownloadError(
            f"{path} does not exist. TFGCVIT_MIRROR points to a directory that must hold "
            f"the checkpoints under their official file names: put {name} there, unset "
            f"TFGCVIT_MIRROR to download it, or pass weights='/path/to/{name}'."
        )
    if sha256 is not None:
        _check_digest(path, sha256, path)
    return path


def fetch(url, sha256=None, filename=None, progress=True):
    """Returns a local path of the file at `url`, downloading it into the cache if needed.

    A cached file is checked against `sha256` (or, when no hash is pinned, the
    digest recorded when it was downloaded) and downloaded again if it differs.
    Concurrent fetches of the same file, by threads or processes, are safe.

    Args:
        url: an http(s) or file:// URL, or a local path (e.g. the result of
            `mirrored`). Local files are checked and used in place.
        sha256: the expected hex digest, or None when none is published: then
            the digest of the download is printed once and recorded.
        filename: the name in the cache; defaults to the URL's last component.
        progress: show a progress line on stderr (only when it is a terminal).

    Returns:
        The path of the verified file.

    Raises:
        DownloadError: the server cannot be reached, answers with an error,
            or sends a truncated or corrupted file.
    """
    sha256 = sha256.lower() if sha256 else None
    if not url.startswith(("http://", "https://", "file://")):
        return _fetch_local(os.path.expanduser(url), sha256)
    if url.startswith("file://"):
        return _fetch_local(urllib.request.url2pathname(urllib.parse.urlparse(url).path), sha256)

    filename = _safe_file_name(filename or _url_file_name(url), url)
    directory = checkpoints_dir()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise DownloadError(
            f"Cannot create the cache directory {directory} ({error}). Set TFGCVIT_HOME "
            "to a writable directory."
        ) from None
    destination = os.path.join(directory, filename)

    with FileLock(destination):
        cached = _verified_cached_file(destination, sha256)
        if cached is not None:
            return cached
        try:
            actual = _download(url, destination, sha256, progress)
        except DownloadError as error:
            raise DownloadError(f"{error} {_hint(url, filename)}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            raise DownloadError(
                f"Could not download {url}: {_describe(error)}. {_hint(url, filename)}"
            ) from None
    if sha256 is None and destination not in _ANNOUNCED:
        _ANNOUNCED.add(destination)
        sys.stderr.write(
            f"tfgcvit: no published sha256 for {filename}; downloaded file has sha256 "
            f"{actual}, recorded in {_sidecar_path(destination)} and checked on later loads.\n"
        )
    return destination

