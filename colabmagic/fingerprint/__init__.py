"""Audio fingerprinting (landmark hashes) on NumPy or CuPy.

>>> from colabmagic.fingerprint import Fingerprinter, Index, match, dedup
>>> idx = Index("music.fpdb")                       # doctest: +SKIP
>>> idx.add(["~/Music"], workers=2)                 # doctest: +SKIP
>>> match(idx, "clip.mp3")                          # doctest: +SKIP
[Match(track='~/Music/song.flac', score=41.2, aligned=96, offset_s=63.2, ...)]
"""

from colabmagic.fingerprint._xp import Backend, resolve_backend
from colabmagic.fingerprint.audio import AudioDecodeError, AudioDecodeWarning, load_audio
from colabmagic.fingerprint.dedup import DedupResult, dedup
from colabmagic.fingerprint.fingerprinter import Fingerprint, Fingerprinter
from colabmagic.fingerprint.index import AddSummary, FingerprintIndexError, Index, Track
from colabmagic.fingerprint.match import DEFAULT_MIN_SCORE, Match, QueryResult, match, votes

__all__ = [
    "DEFAULT_MIN_SCORE",
    "AddSummary",
    "AudioDecodeError",
    "AudioDecodeWarning",
    "Backend",
    "DedupResult",
    "Fingerprint",
    "FingerprintIndexError",
    "Fingerprinter",
    "Index",
    "Match",
    "QueryResult",
    "Track",
    "dedup",
    "load_audio",
    "match",
    "resolve_backend",
    "votes",
]
