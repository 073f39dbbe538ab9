"""The S3 store: AWS S3 or any S3-compatible server (MinIO in the compose stack, moto in tests).

Objects live at `s3://{bucket}/{prefix}{key}`. A PUT is atomic in S3 (a reader sees the old object or
the new one), which is all the run store's commit order needs. Transient failures (throttling, 5xx,
timeouts, dropped connections) are retried by botocore with exponential backoff ("standard" mode);
what is left after the retries is raised as a StorageError naming the bucket and key, never the
credentials.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from hero_ml.adapters.storage import StorageError
from hero_ml.adapters.storage.keys import check_key, check_prefix

if TYPE_CHECKING:
    from hero_ml.config import StorageConfig

_MISSING = {"404", "NoSuchKey", "NotFound"}
_EXISTS = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}


class S3Store:
    def __init__(self, bucket: str, client: Any, prefix: str = ""):
        """A store on `bucket` through a boto3 S3 `client`; keys are placed below `prefix`."""
        self.bucket = bucket
        self.client = client
        self.prefix = check_prefix(prefix)
        self._bucket_seen = False

    @classmethod
    def from_config(cls, config: StorageConfig) -> S3Store:
        assert config.s3_bucket is not None  # the config validator requires it for backend s3
        endpoint = str(config.s3_endpoint_url) if config.s3_endpoint_url else None
        addressing = config.s3_addressing_style or ("path" if endpoint else "virtual")
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=config.s3_region,
            # None: boto3's own chain (environment, ~/.aws, instance role)
            aws_access_key_id=config.s3_access_key_id.get_secret_value() if config.s3_access_key_id else None,
            aws_secret_access_key=(
                config.s3_secret_access_key.get_secret_value() if config.s3_secret_access_key else None
            ),
            config=Config(
                # total_max_attempts counts the first request; botocore's max_attempts counts retries only
                retries={"total_max_attempts": config.s3_max_attempts, "mode": "standard"},
                connect_timeout=config.s3_timeout_s,
                read_timeout=config.s3_timeout_s,
                s3={"addressing_style": addressing},
                signature_version="s3v4",
            ),
        )
        return cls(config.s3_bucket, client, prefix=config.s3_prefix)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, action: str, full_key: str, err: Exception) -> StorageError:
        """full_key: the bucket key (or listing prefix) as sent, prefix included."""
        detail = err.response.get("Error", {}) if isinstance(err, ClientError) else {}
        what = f"{detail.get('Code')}: {detail.get('Message')}" if detail else type(err).__name__
        hint = ""
        if isinstance(err, NoCredentialsError | PartialCredentialsError):
            hint = (
                "; set HERO_STORAGE__S3_ACCESS_KEY_ID and HERO_STORAGE__S3_SECRET_ACCESS_KEY, or give "
                "AWS credentials (AWS_* variables, ~/.aws, an instance role)"
            )
        elif isinstance(err, BotoCoreError):  # no HTTP answer: the endpoint is where to look
            hint = f"; check storage.s3_endpoint_url ({self.client.meta.endpoint_url}) and that it is up"
        where = f"s3://{self.bucket}/{full_key}"
        return StorageError(f"S3 {action} of {where} failed after retries ({what}){hint}")

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except (ClientError, BotoCoreError) as err:
            raise self._fail("PUT", full, err) from None

    def create(self, key: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): 412 when the key exists, 409 when another conditional
        write to it is in flight. A server that ignores the header (S3-compatible servers before they
        added it) overwrites instead: RunLease reads its record back to catch that."""
        full = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in _EXISTS:
                return False
            raise self._fail("conditional PUT", full, err) from None
        except BotoCoreError as err:
            raise self._fail("conditional PUT", full, err) from None

    def get(self, key: str) -> bytes:
        full = self._key(key)
        # botocore retries a request until its answer's headers; a body cut off while it is read (a
        # dropped connection, a read timeout: botocore checks its length) is retried here, as often
        attempts = (self.client.meta.config.retries or {}).get("total_max_attempts", 1)
        for attempt in range(1, attempts + 1):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in _MISSING:
                    raise KeyError(key) from None
                raise self._fail("GET", full, err) from None
            except BotoCoreError as err:
                raise self._fail("GET", full, err) from None
            try:
                return body.read()
            except BotoCoreError as err:
                if attempt == attempts:
                    raise self._fail("GET", full, err) from None
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in _MISSING:
                self._check_bucket()  # a HEAD's 404 has no body: a missing bucket reads as a missing key
                return False
            raise self._fail("HEAD", full, err) from None
        except BotoCoreError as err:
            raise self._fail("HEAD", full, err) from None

    def _check_bucket(self) -> None:
        """Raise StorageError when the bucket does not exist (asked once per store)."""
        if self._bucket_seen:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in _MISSING | {"NoSuchBucket"}:
                raise StorageError(
                    f"S3 bucket {self.bucket!r} does not exist at {self.client.meta.endpoint_url}: check "
                    "storage.s3_bucket (HERO_STORAGE__S3_BUCKET), or create the bucket"
                ) from None
            # another answer (e.g. 403: a key may read objects but not the bucket): the key's 404 stands
        except BotoCoreError as err:
            raise self._fail("HEAD", "", err) from None
        self._bucket_seen = True

    def list(self, prefix: str) -> dict[str, int]:
        full = self.prefix + check_prefix(prefix)
        found: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                for item in page.get("Contents", []):
                    if not item["Key"].endswith("/"):  # a console's "folder": no object of a store
                        found[item["Key"][len(self.prefix) :]] = int(item["Size"])
        except (ClientError, BotoCoreError) as err:
            raise self._fail("LIST", full, err) from None
        return dict(sorted(found.items()))

    def where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key) if key else self.prefix}"
