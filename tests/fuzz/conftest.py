"""Make the corpus helpers (tests/corpus/stcraft.py, make_corpus.py) importable from the fuzz suite."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
