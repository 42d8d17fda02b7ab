"""The tools' one sys.path edit: the repository root, so that `import train_gpt2` works from tools/*.py."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
