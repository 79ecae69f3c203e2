"""Object storage behind one small interface (base.ObjectStore: list, head, read, write, sign, fetch).

The sensor, the assets, the report and the seed API talk to `ImageStorage` (resources.py), which adds what the
pipeline needs on top of any store: where images and models live, and verified local copies. S3 (s3.py) is the
first store; another object store is one more module implementing ObjectStore.
"""
