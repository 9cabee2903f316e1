"""Parameter sweeps: one command template, the cartesian product of parameter values."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence

from colabmagic.errors import ParameterError
from colabmagic.experiments.spec import NAME_PATTERN, Experiment

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_param(text: str) -> tuple[str, list[str]]:
    """Parse ``lr=0.001,0.01`` into ``("lr", ["0.001", "0.01"])``.

    Raises
    ------
    ParameterError
        Not of the form ``NAME=V1,V2,...``.
    """
    key, sep, values = text.partition("=")
    key = key.strip()
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not items:
        msg = f"--param {text!r} must look like NAME=V1,V2,... (e.g. lr=0.001,0.01)"
        raise ParameterError(msg)
    return key, items


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def expand_grid(
    template: str,
    params: Mapping[str, Sequence[str]],
    *,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    gpus: int = 1,
    tags: Sequence[str] = (),
) -> list[Experiment]:
    """Expand a command template over every combination of parameter values.

    Parameters
    ----------
    template : str
        Command with ``{param}`` placeholders, e.g. ``python train.py --lr {lr} --bs {bs}``.
        Other braces (``${HOME}``) are left alone.
    params : mapping of str to sequence of str
        Values per parameter; kept as typed (``0.001`` stays ``0.001``).
    name : str, optional
        Name pattern, e.g. ``hparam_{lr}_{bs}``; default ``grid_{p1}_{p2}...``.
    timeout, retries, gpus, tags
        Copied into every experiment.

    Returns
    -------
    list of Experiment
        In row-major order of *params*.

    Raises
    ------
    ParameterError
        A parameter appears in neither template nor name, names collide, or a name is invalid.
    """
    if not params:
        msg = "give at least one --param NAME=V1,V2,..."
        raise ParameterError(msg)
    pattern = name or "grid_" + "_".join(f"{{{k}}}" for k in params)
    used = set(_PLACEHOLDER.findall(template)) | set(_PLACEHOLDER.findall(pattern))
    for key in params:
        if key not in used:
            msg = f"parameter {key!r} appears in neither the template nor the name; add {{{key}}}"
            raise ParameterError(msg)
    keys = list(params)
    out: list[Experiment] = []
    seen: set[str] = set()
    for combo in itertools.product(*(params[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        exp_name = _fill(pattern, values)
        if not re.fullmatch(NAME_PATTERN, exp_name):
            msg = (
                f"grid name {exp_name!r} is not a valid experiment name; use letters, digits and "
                "_ . = + - in --name"
            )
            raise ParameterError(msg)
        if exp_name in seen:
            msg = f"--name {pattern!r} gives {exp_name!r} twice; put every parameter in it"
            raise ParameterError(msg)
        seen.add(exp_name)
        out.append(
            Experiment(
                name=exp_name,
                command=_fill(template, values),
                timeout=timeout,
                retries=retries,
                gpus=gpus,
                tags=tuple(tags),
            )
        )
    return out
