"""The embedded default corpus: aligned English-Spanish Bible verses from two Debian packages.

``sword-text-kjv`` (King James Version) and ``sword-text-sparv`` (Reina-Valera 1909) are SWORD
modules in the zText format, both in KJV versification, so verse ``i`` of one is verse ``i`` of the
other (about 32,000 pairs). The format, read with the standard library only:

* ``<testament>.bzv``: one 10-byte record ``<IIH`` per verse: block number, offset inside the
  decompressed block, length in bytes (0: the verse is empty in this module);
* ``<testament>.bzs``: one 12-byte record ``<III`` per block: offset and size of its zlib stream
  in ``.bzz`` (the third field, the uncompressed size, is not needed);
* ``<testament>.bzz``: the zlib-compressed blocks (one per book: ``BlockType=BOOK``).

Verses carry OSIS markup (``<w lemma=...>`` word tags, ``<note>`` footnotes, ``<title>`` headings,
milestones); footnotes and headings are dropped with their text, every other tag keeps its text.
The packages are fetched without root as every modality fetches its Debian data
(:func:`modalities.kit.unpack_deb`: ``apt-get download`` and ``dpkg-deb -x`` into the run's cache).
"""
from __future__ import annotations

import html
import re
import shutil
import struct
import zlib
from pathlib import Path

from smoothpurify import SmoothPurifyError
from modalities.kit import unpack_deb

PACKAGES = {"en": ("sword-text-kjv", "engKJV2006eb"), "es": ("sword-text-sparv", "spaRV1909eb")}
TESTAMENTS = ("ot", "nt")
_ZTEXT = Path("usr/share/sword/modules/texts/ztext")
# Elements whose text is not part of the verse (footnotes, headings, cross references).
_DROPPED = re.compile(r"<(note|title|rdg)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def strip_markup(raw: str) -> str:
    """Plain verse text: footnotes and headings removed, other tags unwrapped, entities unescaped."""
    text = _TAG.sub(" ", _DROPPED.sub(" ", raw))
    text = html.unescape(text)
    # Tags are replaced by spaces so adjacent words never fuse; undo the space this leaves before punctuation.
    text = re.sub(r"\s+([,.;:!?)\]])", r"\1", _SPACE.sub(" ", text))
    text = re.sub(r"([¿¡(\[])\s+", r"\1", text)
    return text.strip()


def read_ztext(module_dir: Path, testament: str) -> list[str]:
    """Every verse of one testament of a zText module, markup kept (empty string: no text)."""
    base = Path(module_dir) / testament
    try:
        bzs, bzv, bzz = (base.with_suffix(ext).read_bytes() for ext in (".bzs", ".bzv", ".bzz"))
    except OSError as err:
        raise SmoothPurifyError(f"zText module {module_dir}: cannot read {testament}.bzs/.bzv/.bzz ({err.strerror})") from None
    if len(bzs) % 12 or len(bzv) % 10:
        raise SmoothPurifyError(f"zText module {module_dir}: {testament} index sizes are not whole records")
    blocks = [struct.unpack_from("<III", bzs, i)[:2] for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    verses = []
    for i in range(0, len(bzv), 10):
        block, offset, size = struct.unpack_from("<IIH", bzv, i)
        if size == 0:
            verses.append("")
            continue
        if block >= len(blocks):
            raise SmoothPurifyError(f"zText module {module_dir}: verse record {i // 10} points at missing block {block}")
        if block not in cache:
            start, length = blocks[block]
            try:
                cache[block] = zlib.decompress(bzz[start:start + length])
            except zlib.error:
                raise SmoothPurifyError(f"zText module {module_dir}: block {block} of {testament}.bzz is not zlib data") from None
        verses.append(cache[block][offset:offset + size].decode("utf-8", errors="replace"))
    return verses


def aligned_verses(src_dir: Path, tgt_dir: Path) -> list[tuple[str, str]]:
    """``(source, target)`` plain-text pairs of the verses both modules hold (same versification)."""
    pairs = []
    for testament in TESTAMENTS:
        src, tgt = read_ztext(src_dir, testament), read_ztext(tgt_dir, testament)
        if len(src) != len(tgt):
            raise SmoothPurifyError(f"{src_dir.name} and {tgt_dir.name} disagree on the number of {testament} verses")
        for a, b in zip(src, tgt):
            a, b = strip_markup(a), strip_markup(b)
            if a and b:
                pairs.append((a, b))
    return pairs


def fetch_module(cache_dir: Path, package: str, module: str) -> Path:
    """The zText folder of ``module`` from the Debian ``package``, fetched once into ``cache_dir``."""
    target = Path(cache_dir) / f"{package}-deb"
    folder = target / _ZTEXT / module.lower()
    if not folder.is_dir():
        folder = target / _ZTEXT / module
    if (folder / "nt.bzz").is_file():
        return folder
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise SmoothPurifyError(f"the default translation corpus needs apt-get and dpkg-deb to fetch {package}; "
                                "set translation.dataset: local with data_path")
    unpack_deb(package, target)
    for name in (module, module.lower()):
        if (target / _ZTEXT / name / "nt.bzz").is_file():
            return target / _ZTEXT / name
    raise SmoothPurifyError(f"{package} holds no zText module {module}")


def bible_pairs(cache_dir: Path, src_lang: str = "en", tgt_lang: str = "es") -> list[tuple[str, str]]:
    """The aligned verse pairs of the two packaged Bibles."""
    for lang in (src_lang, tgt_lang):
        if lang not in PACKAGES:
            raise SmoothPurifyError(f"the packaged Bibles are {', '.join(PACKAGES)}; got language {lang!r}")
    dirs = [fetch_module(cache_dir, *PACKAGES[lang]) for lang in (src_lang, tgt_lang)]
    return aligned_verses(*dirs)
