"""The seed's command: `python data/cached_fineweb10B.py N` fetches the FineWeb 10B validation shard and the
first N training shards into data/fineweb10B/. The same as `python data/cached_fineweb.py N`; see there."""

from cached_fineweb import main

if __name__ == "__main__":
    main(default_dataset="fineweb10B")
