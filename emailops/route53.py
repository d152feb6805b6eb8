"""Route 53 self-registration: a web task puts its private IPv4 address under a name in a private
hosted zone, so that Lambda workers find the worker API without a load balancer.

At start (after the server listens) the task reads its address and task id from the ECS task
metadata endpoint (`ECS_CONTAINER_METADATA_URI_V4`) and UPSERTs an A record
`ROUTE53_RECORD_NAME` in `ROUTE53_ZONE_ID`: a multivalue answer (or a weighted record) whose set
identifier is the task id, so that several web tasks each keep their own record under the one
name. On SIGTERM it deletes its record first, keeps serving for `ROUTE53_DRAIN_S` while resolvers
forget it (the TTL is short), then stops. Both calls retry with exponential back-off until
`ROUTE53_TIMEOUT_S` has passed; then `RegistrationError` says which endpoint did not answer and
the web role exits non-zero, so ECS replaces the task instead of leaving it unreachable.

See docs/deploy.md for when to use this and when an internal load balancer or ECS service
discovery (Cloud Map) is the better answer.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

ROUTINGS = ("multivalue", "weighted")


class RegistrationError(Exception):
    """The task could not register (or deregister) its address; the message says where."""


@dataclass(frozen=True)
class TaskAddress:
    task_id: str
    ipv4: str


def _retrying(what: str, call: Callable, *, timeout_s: float, sleep=time.sleep, retryable=()):
    """`call()` until it succeeds, backing off 0.5, 1, 2 … (at most 8) seconds, for at most
    `timeout_s`; then RegistrationError naming `what` and the last error."""
    deadline = time.monotonic() + timeout_s
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            return call()
        except retryable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RegistrationError(
                    f"{what}: still failing after {attempt} attempts in {timeout_s:g} s: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc,
                        min(delay, left))  # fmt: skip
            sleep(min(delay, left))
            delay = min(delay * 2, 8.0)


def read_task_address(metadata_uri: str, *, timeout_s: float = 30.0, sleep=time.sleep):
    """This task's id and private IPv4 address, from the ECS task metadata endpoint (v4)."""
    if not metadata_uri:
        raise RegistrationError(
            "ECS_CONTAINER_METADATA_URI_V4 is not set: self-registration needs the ECS task "
            "metadata endpoint (ECS sets it on Fargate); unset ROUTE53_ZONE_ID to run without"
        )

    def get(path: str) -> dict:
        with urllib.request.urlopen(metadata_uri.rstrip("/") + path, timeout=5) as response:  # noqa: S310
            return json.load(response)

    def fetch() -> TaskAddress:
        container, task = get(""), get("/task")
        ipv4 = next(
            (
                address
                for network in container.get("Networks") or ()
                for address in network.get("IPv4Addresses") or ()
            ),
            None,
        )
        arn = task.get("TaskARN") or ""
        if not ipv4 or not arn:
            raise RegistrationError(
                f"the task metadata at {metadata_uri} has no IPv4 address or task ARN "
                "(the task must use the awsvpc network mode)"
            )
        return TaskAddress(task_id=arn.rsplit("/", 1)[-1], ipv4=ipv4)

    return _retrying(
        f"reading the task metadata at {metadata_uri}",
        fetch,
        timeout_s=timeout_s,
        sleep=sleep,
        retryable=(OSError, urllib.error.URLError, ValueError),
    )


@dataclass
class Registration:
    zone_id: str
    record_name: str
    metadata_uri: str
    ttl: int = 10
    routing: str = "multivalue"
    timeout_s: float = 60.0
    drain_s: float = 15.0
    region: str | None = None
    client: object = None
    address: TaskAddress | None = None
    registered: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Registration | None:
        """The registration the environment asks for, or None when ROUTE53_ZONE_ID is unset."""
        zone_id = env.get("ROUTE53_ZONE_ID", "").strip()
        if not zone_id:
            return None
        name = env.get("ROUTE53_RECORD_NAME", "").strip()
        routing = env.get("ROUTE53_ROUTING", "multivalue").strip()
        if not name:
            raise RegistrationError("ROUTE53_ZONE_ID is set but ROUTE53_RECORD_NAME is not")
        if routing not in ROUTINGS:
            raise RegistrationError(f"ROUTE53_ROUTING must be one of {ROUTINGS}, not {routing!r}")
        ttl = int(env.get("ROUTE53_TTL", "10"))
        return cls(
            zone_id=zone_id.rsplit("/", 1)[-1],
            record_name=name.rstrip(".") + ".",
            metadata_uri=env.get("ECS_CONTAINER_METADATA_URI_V4", ""),
            ttl=ttl,
            routing=routing,
            timeout_s=float(env.get("ROUTE53_TIMEOUT_S", "60")),
            drain_s=float(env.get("ROUTE53_DRAIN_S", str(ttl + 5))),
            region=env.get("AWS_REGION") or None,
        )

    @property
    def route53(self):
        if self.client is None:
            import boto3
            from botocore.config import Config

            # Our own loop retries (with a deadline); one quick attempt each from botocore.
            self.client = boto3.client(
                "route53",
                region_name=self.region,
                config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10),
            )
        return self.client

    def record_set(self) -> dict:
        assert self.address is not None
        record = {
            "Name": self.record_name,
            "Type": "A",
            "SetIdentifier": self.address.task_id,
            "TTL": self.ttl,
            "ResourceRecords": [{"Value": self.address.ipv4}],
        }
        if self.routing == "weighted":
            record["Weight"] = 1
        else:
            record["MultiValueAnswer"] = True
        return record

    def _change(self, action: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        def call():
            self.route53.change_resource_record_sets(
                HostedZoneId=self.zone_id,
                ChangeBatch={
                    "Comment": f"emailops web task {self.address.task_id}",
                    "Changes": [{"Action": action, "ResourceRecordSet": self.record_set()}],
                },
            )

        def retryable_client_error(exc: ClientError) -> bool:
            code = exc.response.get("Error", {}).get("Code", "")
            return code in ("Throttling", "PriorRequestNotComplete", "ServiceUnavailable")

        class _Retry(Exception):
            pass

        def attempt():
            try:
                call()
            except ClientError as exc:
                if retryable_client_error(exc):
                    raise _Retry(str(exc)) from exc
                if action == "DELETE" and "not found" in str(exc):
                    return  # already gone (an earlier attempt went through)
                raise RegistrationError(
                    f"Route 53 refused to {action} {self.record_name} in zone {self.zone_id}: {exc}"
                ) from exc
            except BotoCoreError as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from exc

        _retrying(
            f"{action} of {self.record_name} in Route 53 zone {self.zone_id}",
            attempt,
            timeout_s=self.timeout_s,
            retryable=(_Retry,),
        )

    def register(self) -> TaskAddress:
        self.address = read_task_address(self.metadata_uri, timeout_s=self.timeout_s)
        self._change("UPSERT")
        self.registered = True
        log.info(
            "registered %s -> %s in zone %s (set %s, ttl %d s)",
            self.record_name, self.address.ipv4, self.zone_id, self.address.task_id, self.ttl,
        )  # fmt: skip
        return self.address

    def deregister(self) -> None:
        """Delete this task's record (only its own set identifier); idempotent."""
        if not self.registered:
            return
        self._change("DELETE")
        self.registered = False
        log.info("deregistered %s (set %s)", self.record_name, self.address.task_id)
