"""Reaching a store over HTTP: one httpx client per process with explicit limits and
timeouts (client.py), the checks every reply must pass before its bytes count
(checks.py), credentials read from files (credentials.py) and the store's metadata
fetched through the client (metadata.py); S3 stores (target.py, s3.py: the SigV4
signer, aws_credentials.py, s3errors.py, listing.py) and what runs before a mount
(bucket.py, bucket_index.py for `index s3://`, discovery.py for `--no-index`). The only
layer that imports httpx and httpcore; it uses trio and may import the core, linux and
store.
"""
