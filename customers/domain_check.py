"""Does a customer's from-domain publish what mailbox providers ask of bulk senders?

Three TXT lookups, each judged on its own: SPF at the domain (exactly one ``v=spf1`` record,
RFC 7208 §4.5), DKIM at ``<selector>._domainkey.<domain>`` (a key, ``p=`` not empty: an empty one
is a revoked key, RFC 6376 §3.6.1), DMARC at ``_dmarc.<domain>`` (a ``v=DMARC1`` record; its
policy shown — ``p=none`` is what Gmail and Yahoo require at least, and only monitors).

This says what DNS publishes, not that the provider signs with that key or that the SPF record
names the provider: those depend on the provider's own set-up. A lookup that fails (timeout, no
server answering) says so and judges nothing. Resolvers: ``DNS_NAMESERVERS`` (the system's when
empty), ``DNS_PORT``, each check bounded by ``DNS_TIMEOUT_S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import dns.exception
import dns.resolver
from django.conf import settings


class Verdict(StrEnum):
    OK = "ok"
    WARNING = "warning"
    MISSING = "missing"
    ERROR = "error"  # published, but wrong
    UNCHECKED = "unchecked"  # the lookup itself failed


LABELS = {
    Verdict.OK: "OK",
    Verdict.WARNING: "Warning",
    Verdict.MISSING: "Missing",
    Verdict.ERROR: "Error",
    Verdict.UNCHECKED: "Not checked",
}


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # "SPF", "DKIM", "DMARC"
    name: str  # the name looked up
    verdict: Verdict
    summary: str  # one line for staff
    records: tuple[str, ...] = ()  # what was found, as published

    @property
    def label(self) -> str:
        return LABELS[self.verdict]


@dataclass(frozen=True, slots=True)
class DomainReport:
    domain: str
    findings: tuple[Finding, ...]

    @property
    def all_ok(self) -> bool:
        return all(f.verdict is Verdict.OK for f in self.findings)


class _Unreachable(Exception):
    """The lookup did not get an answer (timeout, no usable server)."""


def from_domain(address: str) -> str:
    """The domain part of an address, lower-cased, without a trailing dot."""
    return address.rpartition("@")[2].strip().rstrip(".").lower()


def make_resolver() -> dns.resolver.Resolver:
    """A resolver from settings: the system's servers unless DNS_NAMESERVERS names some."""
    nameservers = list(settings.DNS_NAMESERVERS)
    try:
        resolver = dns.resolver.Resolver(configure=not nameservers)
    except dns.resolver.NoResolverConfiguration:
        resolver = dns.resolver.Resolver(configure=False)
    if nameservers:
        resolver.nameservers = nameservers
        resolver.port = settings.DNS_PORT
    resolver.lifetime = settings.DNS_TIMEOUT_S
    resolver.timeout = settings.DNS_TIMEOUT_S
    return resolver


def _txt(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """The TXT records at `name`, each one's strings joined (long keys come split in 255-byte
    strings); [] when the name or the record type does not exist."""
    try:
        answer = resolver.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:  # timeouts, no server answering, a bad name
        raise _Unreachable(str(exc) or exc.__class__.__name__) from exc
    return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]


def _tags(record: str) -> dict[str, str]:
    """A DKIM or DMARC record's tag=value list (RFC 6376 §3.2), names lower-cased."""
    tags = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = "".join(value.split())
    return tags


def _judge(check: str, name: str, found: list[str]):
    """say(verdict, summary): this check's finding, with the records found."""
    return lambda verdict, summary: Finding(check, name, verdict, summary, tuple(found))


def check_spf(records: list[str], name: str) -> Finding:
    spf = [r for r in records if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")]
    say = _judge("SPF", name, spf)
    if not spf:
        return say(Verdict.MISSING, "No SPF record (v=spf1) is published.")
    if len(spf) > 1:
        return say(
            Verdict.ERROR,
            f"{len(spf)} SPF records are published; receivers treat that as an error "
            "(RFC 7208 §4.5). Merge them into one.",
        )
    if spf[0].split()[-1].lower() in ("+all", "all"):
        return say(
            Verdict.WARNING, 'The SPF record ends in "+all": anyone may send as this domain.'
        )
    return say(Verdict.OK, "One SPF record is published.")


def check_dkim(records: list[str], name: str) -> Finding:
    keys = [r for r in records if "p" in _tags(r)]
    say = _judge("DKIM", name, keys)
    if not keys:
        return say(Verdict.MISSING, "No DKIM key is published at this selector.")
    if len(keys) > 1:
        return say(
            Verdict.ERROR,
            f"{len(keys)} DKIM keys are published at one selector; receivers may pick either.",
        )
    if not _tags(keys[0])["p"]:
        return say(
            Verdict.ERROR,
            'The key at this selector is revoked (empty "p="): signatures with it fail.',
        )
    return say(Verdict.OK, "A DKIM key is published.")


def check_dmarc(records: list[str], name: str) -> Finding:
    dmarc = [r for r in records if r.replace(" ", "").lower().startswith("v=dmarc1")]
    say = _judge("DMARC", name, dmarc)
    if not dmarc:
        return say(
            Verdict.MISSING,
            "No DMARC record is published. Gmail and Yahoo require one of bulk senders "
            '(at least "p=none").',
        )
    if len(dmarc) > 1:
        return say(
            Verdict.ERROR,
            f"{len(dmarc)} DMARC records are published; receivers then apply none of them.",
        )
    policy = _tags(dmarc[0]).get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return say(
            Verdict.ERROR,
            'The DMARC record has no valid policy ("p=none", "p=quarantine" or "p=reject").',
        )
    if policy == "none":
        return say(
            Verdict.OK,
            'Policy "none": enough for Gmail and Yahoo; failures are reported, not acted on.',
        )
    return say(Verdict.OK, f'Policy "{policy}".')


def check_domain(
    domain: str, dkim_selector: str = "", *, resolver: dns.resolver.Resolver | None = None
) -> DomainReport:
    """SPF, DKIM (when a selector is given) and DMARC for `domain`, one lookup each."""
    resolver = resolver or make_resolver()
    checks = [("SPF", domain, check_spf)]
    if dkim_selector:
        checks.append(("DKIM", f"{dkim_selector}._domainkey.{domain}", check_dkim))
    checks.append(("DMARC", f"_dmarc.{domain}", check_dmarc))
    findings = []
    for check, name, judge in checks:
        try:
            findings.append(judge(_txt(resolver, name), name))
        except _Unreachable as exc:
            findings.append(
                Finding(check, name, Verdict.UNCHECKED, f"Could not be looked up: {exc}")
            )
    if not dkim_selector:
        findings.insert(
            1,
            Finding(
                "DKIM",
                f"?._domainkey.{domain}",
                Verdict.UNCHECKED,
                "No DKIM selector is entered for this customer: enter the one the provider "
                "signs with to check its key.",
            ),
        )
    return DomainReport(domain=domain, findings=tuple(findings))
