import sys
from pathlib import Path

# factories.py sits next to the tests; make it importable however pytest was started.
sys.path.insert(0, str(Path(__file__).resolve().parent))
