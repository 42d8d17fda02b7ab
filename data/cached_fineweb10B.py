"""The seed's command: `python data/cached_fineweb10B.py N` fetches the FineWeb 10B validation shard and the
first N training shards into data/fineweb10B/. The same as `python data/cached_fineweb.py N`; see there."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cached_fineweb import main  # noqa: E402

if __name__ == "__main__":
    main(default_dataset="fineweb10B")
