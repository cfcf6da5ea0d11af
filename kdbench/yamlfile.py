"""YAML as users write it: numbers in the notation of YAML 1.2 and of every paper's appendix.

PyYAML implements YAML 1.1, which reads ``1e-3``, ``5e-4`` and ``1E3`` as *strings* (its
floats need a dot in the mantissa and a sign in the exponent). Learning rates and weight
decays are written that way everywhere, so experiment files and ``--set`` values are read
with YAML 1.2's rule for floats: an optional sign, digits with an optional dot (or a dot and
digits), an optional exponent with an optional sign; plus ``.inf`` and ``.nan``. Integers,
booleans and everything else keep PyYAML's safe rules.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# Only forms with a dot or an exponent: plain digits stay integers.
FLOAT = re.compile(r"""^[-+]?(?:
    [0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?   # 1.  1.5  1.5e-3
  | \.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?           # .5  .5e3
  | [0-9][0-9_]*[eE][-+]?[0-9]+                  # 1e-3  5E4
  | \.(?:inf|Inf|INF)                            # .inf
  | \.(?:nan|NaN|NAN)                            # .nan (no sign)
)$""", re.X)


YAMLError = yaml.YAMLError


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats."""


# Drop 1.1's float rule (its first characters are the keys of the resolver table) and add ours.
Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT, list("-+0123456789."))


def load(text: str) -> Any:
    """Parse one YAML document (an experiment file, a ``--set`` value)."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_number(text: str) -> float | None:
    """The float a string spells in YAML 1.2 notation (``'1e-3'``), else None: for values that
    reach a float parameter as strings from somewhere other than this loader."""
    text = text.strip()
    if not FLOAT.match(text) and not re.fullmatch(r"[-+]?[0-9][0-9_]*", text):
        return None
    lowered = text.replace("_", "").lower()
    if lowered.lstrip("+-") in (".inf",):
        return float("-inf") if lowered.startswith("-") else float("inf")
    if lowered == ".nan":
        return float("nan")
    return float(lowered)
