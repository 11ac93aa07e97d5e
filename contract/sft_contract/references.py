"""The grammar of every reference field: sources, destinations, URLs, revisions and image references.

Each field's grammar is a short list of ``Rule``s. The CRD carries them as CEL rules (the API server refuses
a bad value at admission), and the pydantic models evaluate the very same regular expressions offline
(``sftctl validate``, the trainer), so both say the same thing about the same value. The expressions are
written in the subset that Go's RE2 (CEL ``matches``) and Python's ``re`` read alike: no look-arounds, no
``\\w``/``\\d`` (Unicode in Python), no POSIX classes.

Why so strict: these strings become paths under a root (``/mnt/pvc/<claim>``, the fetch cache), land in
ConfigMaps, logs and Events, and reach registries. A ``.`` or ``..`` segment, credentials in a URL or a
malformed image reference is refused before anything uses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_CTL = r"\x00-\x1f\x7f"
# One path segment: not empty, not `.` or `..` (a segment with a non-dot character), no control characters.
SEGMENT = rf"[.]*[^./{_CTL}][^/{_CTL}]*"
PATH = rf"{SEGMENT}(/{SEGMENT})*"
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
# S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, a letter or digit at each end.
BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"

PVC = rf"^pvc://{DNS_LABEL}(/{PATH})?/?$"
S3 = rf"^s3://{BUCKET}(/{PATH})?/?$"
# A hub repo id (`name` or `namespace/name`) or a relative local path: plain segments either way.
HUB_ID_OR_RELATIVE = rf"^{PATH}$"
EXPLICIT_LOCAL = ("/", "~", "./", "../")
ANY_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*://"
NO_CONTROL = rf"^[^{_CTL}]*$"

# An http(s) URL: host (DNS name, IPv4 or [IPv6]) and port, an optional path; no userinfo, query or fragment.
_HOST = r"([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
HTTP_URL = rf"^https?://{_HOST}(:[0-9]{{1,5}})?(/[^?#\x00-\x20\x7f]*)?$"
USERINFO = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@"

# A git revision as the hub takes it: a branch, tag (`v1.0`, `refs/pr/1`) or commit; no segment starts with a dot.
REVISION = r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*(/[A-Za-z0-9_+-][A-Za-z0-9._+-]*)*$"

# The distribution reference grammar (github.com/distribution/reference, regexp.go): [host[:port]/]path[:tag][@digest].
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"([._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}({_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"({_DOMAIN_COMPONENT}([.]{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(:[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE = rf"^({_DOMAIN}/)?{_PATH_COMPONENT}(/{_PATH_COMPONENT})*(:{_TAG})?(@{_DIGEST})?$"


def _python(pattern: str) -> re.Pattern[str]:
    # RE2's `$` is the end of the text; Python's also matches before a final newline.
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def _cel_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Rule:
    """One grammar rule: the value must match ``pattern`` (or must not, with ``refuse``), checked only for
    values that start with ``when`` and not for values that start with one of ``unless``."""

    pattern: str
    message: str
    refuse: bool = False
    when: str = ""
    unless: tuple[str, ...] = ()

    def applies(self, value: str) -> bool:
        return value.startswith(self.when) and not value.startswith(self.unless)

    def holds(self, value: str) -> bool:
        if not self.applies(value):
            return True
        return (_python(self.pattern).search(value) is None) == self.refuse

    def cel(self) -> dict[str, str]:
        test = f"self.matches({_cel_string(self.pattern)})"
        parts = [f"!self.startsWith({_cel_string(self.when)})"] if self.when else []
        parts += [f"self.startsWith({_cel_string(u)})" for u in self.unless]
        parts.append(f"!{test}" if self.refuse else test)
        return {"rule": " || ".join(parts), "message": self.message}


def check(rules: tuple[Rule, ...], value: str) -> str:
    """``value`` if every rule holds, else ValueError with the first broken rule's message (never the value:
    it may hold a credential)."""
    for rule in rules:
        if not rule.holds(value):
            raise ValueError(rule.message)
    return value


def cel_rules(rules: tuple[Rule, ...]) -> dict[str, Any]:
    return {"x-kubernetes-validations": [r.cel() for r in rules]}


CONTROL_CHARACTERS = Rule(NO_CONTROL, "must not contain control characters (newlines, tabs, NUL)")

SOURCE_RULES = (
    CONTROL_CHARACTERS,
    Rule(PVC, "a pvc:// location must be pvc://<claim>/<path>: the claim a DNS-1123 label, the path relative, "
         "without empty, . or .. segments", when="pvc://"),
    Rule(S3, "an s3:// location must be s3://<bucket>/<key>: the bucket 3-63 lowercase letters, digits, dots and "
         "hyphens, the key without empty, . or .. segments", when="s3://"),
    Rule(ANY_SCHEME, "only pvc:// and s3:// locations are supported; otherwise give a hub id (namespace/name) or "
         "a local path", refuse=True, unless=("pvc://", "s3://")),
    Rule(HUB_ID_OR_RELATIVE, "a hub id is namespace/name, and a relative path has no empty, . or .. segments "
         "(start a local path with /, ./ or ~)", unless=("pvc://", "s3://", *EXPLICIT_LOCAL)),
)

def url_rules(secret_ref: str) -> tuple[Rule, ...]:
    """An http(s) URL field; ``secret_ref`` names the sibling field that holds its credentials instead."""
    return (
        Rule(USERINFO, "must not carry credentials (user:password@): the URL is copied into the ConfigMap, logs "
             f"and Events; put them in a Secret and reference it with {secret_ref}", refuse=True),
        Rule(HTTP_URL, "must be an http:// or https:// URL: scheme, host, optional :port and path, no query or "
             "fragment, e.g. http://mlflow.mlflow:5000"),
    )


REVISION_RULES = (
    Rule(REVISION, "must be a branch, tag or commit: letters, digits, . _ + - and /, no segment starting with a "
         "dot"),
)

IMAGE_RULES = (
    Rule(IMAGE, "must be an image reference [host[:port]/]path[:tag][@digest], e.g. "
         "ghcr.io/sft-operator/trainer:0.1.0 (the path in lowercase)"),
)


# ---- parsed references (the values already passed the rules above)


def split_pvc(uri: str) -> tuple[str, str]:
    """``pvc://claim/a/b`` -> (``claim``, ``a/b``)."""
    claim, _, sub = uri[len("pvc://") :].partition("/")
    return claim, sub.strip("/")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); the key has no leading or trailing slash."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.strip("/")
