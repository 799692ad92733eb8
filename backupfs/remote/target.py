"""The store a command names: an http(s):// URL or an s3:// bucket prefix, with the
credentials that reach it, resolved once before anything is fetched (or the daemon forks)."""

from dataclasses import dataclass

from backupfs.errors import UsageError
from backupfs.options import MountOptions
from backupfs.remote import aws_credentials, s3
from backupfs.remote.client import check_base_url, redact
from backupfs.remote.credentials import Credentials, load_credentials


@dataclass(frozen=True)
class StoreTarget:
    url: str  # the HTTP(S) URL of the store's top, ending in "/"
    creds: Credentials
    location: s3.S3Location | None = None  # for s3:// stores
    bucket_url: str | None = None  # the bucket's own URL (listings go there), ending in "/"

    @property
    def shown(self) -> str:
        """How messages name the store (never with credentials)."""
        return str(self.location) if self.location is not None else redact(self.url)


def open_target(arg: str, opts: MountOptions) -> StoreTarget:
    if not s3.is_s3_url(arg):
        url = check_base_url(arg)
        return StoreTarget(url, load_credentials(opts, url))
    if opts.token_file is not None or opts.netrc is not None:
        raise UsageError("token_file= and netrc= do not apply to s3:// URLs "
                         "(use credentials_file= or the AWS_* variables)")  # fmt: skip
    location = s3.parse_s3_url(arg)
    region = aws_credentials.region_for(opts.region, opts.profile)
    endpoint = s3.endpoint_of(opts.endpoint, region)
    url = s3.base_url(location, endpoint, opts.addressing)
    bucket_url = s3.base_url(s3.S3Location(location.bucket, ""), endpoint, opts.addressing)
    return StoreTarget(url, load_credentials(opts, url, s3=True), location, bucket_url)
