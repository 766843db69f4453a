"""The S3 client code, kept in one place for every S3 user (the ``s3`` destination; later S3
sources): credentials from variables named in backup.yml or boto3's standard chain, endpoint,
addressing style, CA bundle, checksum policy (request checksums only where an operation requires
them unless configured), timeouts and request retries, and botocore errors mapped to one-line
messages with the fix, secrets scrubbed. boto3 is imported only by modules that need it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bx
import botocore.session
from botocore.config import Config
from botocore.parsers import DEFAULT_TIMESTAMP_PARSER, ResponseParserFactory

from lib.config import Spec
from lib.errors import ToolError

TOOL = "lemon-backup"
#: error codes of trouble that passes (besides every 5xx): retried
TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
}
REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301", "IllegalLocationConstraintException"}


def fast_timestamp(value: Any) -> Any:
    """botocore's timestamp parser (dateutil's generic one) takes about 30 us a value: a third of
    the client's time listing a bucket. Listings carry ISO 8601 UTC ('2026-12-02T03:19:11.000Z'),
    which datetime parses directly (to the same aware UTC time); anything else goes to botocore's."""
    if isinstance(value, str) and len(value) >= 20 and value[10:11] == "T" and value.endswith("Z"):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return DEFAULT_TIMESTAMP_PARSER(value)


def real_version(version: Any) -> str | None:
    """A version id worth sending: None for unversioned buckets (no id, or S3's "null")."""
    return version if isinstance(version, str) and version and version != "null" else None


def is_not_found(exc: bx.ClientError) -> bool:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404


def error_code(exc: bx.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "?"))


class S3Connection:
    """One configured S3 endpoint + bucket + credentials (keys of a backup.yml block: bucket,
    endpoint_url, region, addressing, ca_bundle, request_checksums, access_key_env,
    secret_key_env, session_token_env, profile). ``owner`` names the block in messages
    ("destination 'cloud'"); ``transient``/``refused`` are the error types to raise."""

    def __init__(
        self,
        block: Mapping[str, Any],
        spec: Spec,
        owner: str,
        transient: type[ToolError],
        refused: type[ToolError],
        timeout: float = 30,
        pool_size: int = 10,
        policy: str = "the policy in README (Off-site copies, S3)",
    ) -> None:
        self.block, self.spec, self.owner = block, spec, owner
        self.policy = policy
        self.transient, self.refused = transient, refused
        self.timeout, self.pool_size = timeout, pool_size
        self.bucket: str = block["bucket"]
        self.endpoint_url: str | None = block.get("endpoint_url")
        self.region: str | None = block.get("region")
        self.addressing: str = block.get("addressing") or ("path" if self.endpoint_url else "virtual")
        self.ca_bundle: Path | None = spec.resolve(block["ca_bundle"]) if block.get("ca_bundle") else None
        self.checksums: str = block.get("request_checksums", "when_required")
        self.profile: str | None = block.get("profile")
        self._client: Any = None

    def secret(self, key: str) -> str | None:
        """The value of the variable named by ``key`` (e.g. access_key_env); None when not configured."""
        name = self.block.get(key)
        if not name:
            return None
        value = self.spec.env.get(name)
        if not value:
            raise self.refused(
                f"{self.owner}: {key} names ${name}, which is not set; "
                f"export it or add it to the .env file next to backup.yml"
            )
        return value

    def _secret_values(self) -> list[str]:
        """Credential values that must never appear in a message."""
        values = []
        for key in ("access_key_env", "secret_key_env", "session_token_env"):
            name = self.block.get(key)
            if name and self.spec.env.get(name):
                values.append(self.spec.env[name])
        return values

    def scrub(self, text: str) -> str:
        for value in self._secret_values():
            text = text.replace(value, "***")
        return text

    def session(self) -> boto3.session.Session:
        """A boto3 session with the configured credentials (or the standard chain)."""
        kwargs: dict[str, Any] = {}
        access, secret = self.secret("access_key_env"), self.secret("secret_key_env")
        if access and secret:
            kwargs.update(aws_access_key_id=access, aws_secret_access_key=secret)
            kwargs["aws_session_token"] = self.secret("session_token_env")
        if self.profile:
            kwargs["profile_name"] = self.profile
        if self.region:
            kwargs["region_name"] = self.region
        core = botocore.session.get_session()
        factory = ResponseParserFactory()
        factory.set_parser_defaults(timestamp_parser=fast_timestamp)
        core.register_component("response_parser_factory", factory)
        try:
            return boto3.session.Session(botocore_session=core, **kwargs)
        except bx.ProfileNotFound:
            raise self.refused(
                f"{self.owner}: AWS profile '{self.profile}' not found in ~/.aws/config or "
                f"~/.aws/credentials; create it (aws configure --profile {self.profile}) or fix profile"
            ) from None

    def client(self) -> Any:
        """The S3 client, created on first use."""
        if self._client is not None:
            return self._client
        verify: str | bool = True
        if self.ca_bundle is not None:
            if not self.ca_bundle.is_file():
                raise self.refused(
                    f"{self.owner}: ca_bundle {self.ca_bundle} not found; point it at the CA certificate (PEM)"
                )
            verify = str(self.ca_bundle)
        config = Config(
            s3={"addressing_style": self.addressing},
            signature_version="s3v4",
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            retries={"mode": "standard", "total_max_attempts": 3},
            max_pool_connections=self.pool_size,
            request_checksum_calculation=self.checksums,
            response_checksum_validation=self.checksums,
            user_agent_appid=TOOL,
        )
        with self.mapped("connect"):
            session = self.session()
            region = self.region or session.region_name or "us-east-1"
            self._client = session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=region, verify=verify, config=config
            )
        return self._client

    def reset(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    @contextmanager
    def mapped(self, what: str, passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Turn botocore errors into ``transient`` (retried) or ``refused`` errors with one-line
        messages, secrets scrubbed. Our own errors and ``passthrough`` types pass unchanged."""
        where = f"bucket '{self.bucket}'" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        try:
            yield
        except (ToolError, *passthrough):
            raise
        except bx.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "?"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = self.scrub(str(error.get("Message") or ""))
            if code in TRANSIENT_CODES or status >= 500:
                raise self.transient(f"{what} ({where}): {code} {message}".rstrip()) from None
            if code == "NoSuchBucket" or (exc.operation_name == "HeadBucket" and status == 404):
                raise self.refused(
                    f"{self.owner}: bucket '{self.bucket}' does not exist"
                    f"{' at ' + self.endpoint_url if self.endpoint_url else ''}; create it or fix bucket"
                ) from None
            if code in CREDENTIAL_CODES:
                raise self.refused(
                    f"{self.owner}: the server refused the credentials ({code}); "
                    f"check the keys {self.credential_source()}"
                ) from None
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                raise self.refused(
                    f"{self.owner}: access denied for {what} on {where}; give the tool's user {self.policy}"
                ) from None
            if code in REGION_CODES:
                raise self.refused(
                    f"{self.owner}: {where} is in another region ({code}); set region to the bucket's region"
                ) from None
            raise self.refused(
                f"{self.owner}: {what} ({where}) refused: {exc.operation_name} {code} {message}".rstrip()
            ) from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError):
            raise self.refused(
                f"{self.owner}: no AWS credentials found; set access_key_env and secret_key_env to the "
                f"names of variables holding them, or configure the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"~/.aws/credentials with profile, an instance role)"
            ) from None
        except bx.SSLError as exc:
            raise self.refused(
                f"{self.owner}: TLS check of {self.endpoint_url or 'the endpoint'} failed "
                f"({self.scrub(str(exc))[:200]}); set ca_bundle to the CA certificate that signed it"
            ) from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError):
            raise self.transient(
                f"{self.owner}: {what}: cannot connect to {self.endpoint_url or 'the S3 endpoint'}; "
                "check endpoint_url (scheme, host, port) and that the server is up"
            ) from None
        except (bx.ConnectionError, bx.HTTPClientError, bx.ReadTimeoutError) as exc:
            raise self.transient(f"{what} ({where}): {self.scrub(str(exc))}") from None
        except bx.ParamValidationError as exc:
            raise self.refused(f"{self.owner}: {what}: {self.scrub(str(exc)).splitlines()[-1]}") from None
        except OSError as exc:
            raise self.transient(f"{what} ({where}): {exc.strerror or exc}") from None

    def credential_source(self) -> str:
        # a helper process gets the keys under fixed names; "env_names" holds the configured ones
        names = self.block.get("env_names") or self.block
        if names.get("access_key_env"):
            return f"in ${names['access_key_env']} and ${names.get('secret_key_env')}"
        return f"of the AWS chain{' (profile ' + self.profile + ')' if self.profile else ''}"
