"""What a file that ``torch.load(weights_only=True)`` refused actually is — without unpickling it.

:func:`diagnose` reads the file's bytes and walks its pickle opcodes with :mod:`pickletools`
(which parses, never executes) to tell three cases apart:

- ``not_torch``: not a PyTorch file at all (text, a plain pickle of data, a zip without
  ``data.pkl``, a TorchScript archive, safetensors, gzip, ...);
- ``damaged``: a PyTorch file that is truncated or corrupted (empty, zip without its end
  record, a member failing its CRC, a pickle that stops before its end, missing storages);
- ``code``: a well-formed pickle that names Python callables beyond tensors and plain data,
  i.e. one that would run code if loaded with ``weights_only=False``.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from pathlib import Path

__all__ = ["diagnose", "NOT_TORCH", "DAMAGED", "CODE"]

NOT_TORCH, DAMAGED, CODE = "not_torch", "damaged", "code"

_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch.save(..., _use_new_zipfile_serialization=False)
_LEGACY_PICKLES = 5  # magic, protocol version, sys info, the object, storage keys; raw storages follow
# what torch.save writes for tensors and plain containers (weights_only loads these)
_PLAIN_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                   "builtins.bytearray", "builtins.complex", "builtins.slice", "_codecs.encode")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _scan(stream: io.BufferedIOBase) -> tuple[list[str], list]:
    """Globals named by ONE pickle read from ``stream`` (up to its STOP), and its opcodes' arguments.

    Raises ``ValueError`` when the opcodes are malformed or end before STOP (pickletools'
    own error). ``STACK_GLOBAL`` names are followed through the memo where possible.
    """
    names: list[str] = []
    args: list = []
    recent: list[str | None] = []  # values pushed by string opcodes (None for any other push)
    memo: dict[int, str | None] = {}
    for op, arg, _ in pickletools.genops(stream):
        args.append(arg)
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            mod, name = (recent[-2:] if len(recent) >= 2 else [None, None])
            names.append(f"{mod}.{name}" if mod and name else "<unresolved STACK_GLOBAL>")
        if op.name in _STRING_OPS:
            recent.append(str(arg))
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif op.name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(int(arg)))
        elif op.stack_after and op.name not in ("MARK", "PROTO", "FRAME"):
            recent.append(None)
    return names, args


def _offenders(names: list[str]) -> list[str]:
    return sorted({n for n in names if not n.startswith(_PLAIN_PREFIXES)})


def _describe_other(head: bytes) -> str:
    """A short description of a file that is neither a zip nor a pickle."""
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed data"
    if head.startswith(b"\x89HDF"):
        return "it is an HDF5 file (e.g. Keras weights)"
    if len(head) > 9 and head[8:10] in (b'{"', b"{'") and int.from_bytes(head[:8], "little") < 1 << 32:
        return "it is a safetensors file (read it with safetensors, then torch.save the state_dict)"
    text = head.decode("utf-8", "ignore")  # (a multi-byte character may be cut at the end of ``head``)
    if len(text) >= len(head) // 2 and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it starts with text: {text[:40].splitlines()[0]!r}"
    return f"it starts with the bytes {head[:8].hex(' ')}, which no torch.save file starts with"


def _zip(path: Path, error: BaseException) -> tuple[str, str]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any("/code/" in n or n.endswith("constants.pkl") for n in names):
                return NOT_TORCH, "it is a TorchScript archive (torch.jit.save), not a torch.save checkpoint"
            pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pkl:
                members = ", ".join(names[:5])
                return NOT_TORCH, f"it is a zip archive without data.pkl (members: {members}), not a torch.save file"
            bad = zf.testzip()
            if bad is not None:
                return DAMAGED, f"its member {bad} fails its CRC check"
            data = zf.read(pkl[0])
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        return DAMAGED, f"its zip structure is broken ({type(e).__name__}: {e}); the file was probably cut short"
    try:
        found, _ = _scan(io.BytesIO(data))
    except ValueError as e:
        return DAMAGED, f"its data.pkl is malformed ({e})"
    return _verdict(found, error)


def _pickle_stream(path: Path, error: BaseException) -> tuple[str, str]:
    with open(path, "rb") as f:
        try:
            found, first = _scan(f)
        except ValueError as e:
            return DAMAGED, f"its pickle stream is malformed or cut short ({e})"
        legacy = _TORCH_LEGACY_MAGIC in first
        for _ in range(_LEGACY_PICKLES - 1 if legacy else 0):
            if not f.peek(1):
                return DAMAGED, "it ends inside its pickled header (cut short)"
            try:
                found += _scan(f)[0]
            except ValueError as e:
                return DAMAGED, f"its pickle stream is malformed or cut short ({e})"
    if legacy:
        return _verdict(found, error)
    bad = _offenders(found)
    if bad:
        return CODE, f"it is a plain Python pickle (not a torch.save file) that calls {', '.join(bad[:5])}"
    return NOT_TORCH, "it is a plain Python pickle, not a torch.save file"


def _verdict(found: list[str], error: BaseException) -> tuple[str, str]:
    """A well-formed torch pickle: code if it names non-plain callables, else damaged elsewhere."""
    bad = _offenders(found)
    if bad or (isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error)):
        names = ", ".join(bad[:5]) or _unsupported_line(error)
        return CODE, f"its pickle calls {names}, which is neither a tensor nor plain data"
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "no detail")
    return DAMAGED, f"its pickle is intact but torch cannot rebuild it ({type(error).__name__}: {first[:200]})"


def _unsupported_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        if "Unsupported global:" in line:
            return line.split("Unsupported global:")[1].split(" was not")[0].replace("GLOBAL", "").strip()
    return "a callable"


def diagnose(path: str | Path, error: BaseException) -> tuple[str, str]:
    """``(kind, detail)`` for ``path``, which ``torch.load(weights_only=True)`` failed on with
    ``error``: kind is :data:`NOT_TORCH`, :data:`DAMAGED` or :data:`CODE`; detail is one
    sentence fragment saying what was found. Reads bytes only; never unpickles."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return DAMAGED, "it is empty (0 bytes)"
    if head.startswith(_ZIP_MAGIC):
        return _zip(path, error)
    if head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode: legacy torch.save or a plain pickle
        return _pickle_stream(path, error)
    return NOT_TORCH, _describe_other(head)
