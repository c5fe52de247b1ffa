"""Training methods as registered units: the `Method` a method implements, and the registry every module asks.

A method is everything that differs between `method: uft` (the offline losses over prepared rows, uft_ray/uft/)
and `method: hint_rft` (hint-guided RFT on a rollout actor pool, uft_ray/rft/): its config checks, the config it
resolves when the run opens, its driver (`run`: its plan, its feeds, its per-worker loop, over the shared run
skeleton in uft_ray.runner), whether it has a reference and whether that comes from the reference actor cache,
what holds cluster resources beside its workers, the packages its actors import, its report, its demo, its part
of the CLI's progress line and the metric names its rows carry. No module outside a method's own folder compares
`cfg.method` to a name: it asks `get(cfg.method)` (or `of(cfg)`) and calls the answer.

    from uft_ray import methods
    methods.register(MyMethod())        # a method outside the package: then `method: my_method` validates and runs
    methods.of(cfg).run(cfg)            # what uft_ray.driver.run does

The built-in methods are imported on first use (`get`): their modules import the drivers, which import the
config package, which asks this registry for the method names while it validates; so this module imports none
of the package's modules. A method of another package is found by its name among the `uft_ray.methods` entry
points, or registered by `register` (the run's workers get the registered method with their loop:
uft_ray.runner.fit).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from uft_ray.config import Config
    from uft_ray.report.page import RunInputs
    from uft_ray.runner import RunResult
    from uft_ray.train.hooks import TrainHooks

__all__ = ["ENTRY_POINTS", "Method", "UnknownMethod", "find", "get", "names", "of", "register", "unregister"]

ENTRY_POINTS = "uft_ray.methods"  # the entry-point group of methods other packages ship
# The package's own methods: name -> the module that registers it when imported.
_BUILTIN = {"uft": "uft_ray.uft.method", "hint_rft": "uft_ray.rft.method"}
_METHODS: dict[str, Method] = {}


class Method:
    """What a training method implements. Every hook has a default but `run`; override what the method has.

    `cfg` is the run's `uft_ray.config.Config` (with `cfg.method == self.name`)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""  # one line: what the method trains (the CLI's `--method` help)
    # Config sections of the method's own that its plan depends on, beyond the shared ones (uft_ray.runner):
    # a rerun whose checkpoints follow another plan is refused naming the fields that changed there.
    sections: ClassVar[tuple[str, ...]] = ()
    # The metric names of its own its metrics.jsonl rows carry (beside the shared step, loss, lr, time ones).
    metrics: ClassVar[tuple[str, ...]] = ()
    # Its own config section, a dataclass whose fields all have defaults, or None: written as a top-level section
    # named after the method (`my_method: {alpha: 2}`, overrides `my_method.alpha=2`), typed and checked like the
    # shared ones, in config.yaml and the rerun check like them; read with `options_of(cfg)`.
    options: ClassVar[type | None] = None

    # --- the config

    def options_of(self, cfg: Config) -> Any:
        """The method's own section of `cfg` (its defaults when the config has none)."""
        if self.options is None:
            raise TypeError(f"method {self.name!r} has no config section of its own")
        return cfg.options.get(self.name) or self.options()

    def check(self, cfg: Config, check_paths: bool) -> list[str]:
        """The method's config problems, one message each naming its field (the shared sections are checked by
        uft_ray.config.validation)."""
        return []

    def resolve(self, cfg: Config) -> Config:
        """`cfg` with the method's `auto` values made concrete, once, where the run opens (after Ray is up)."""
        return cfg

    def needs_reference(self, cfg: Config) -> bool:
        """Whether the method's loss has a reference policy at all."""
        return False

    def reference_from_cache(self, cfg: Config) -> bool:
        """Whether the reference log-probs come from the reference actor pool and its cache (a reference pass
        over prepared rows, before or beside training), rather than from the trainer itself."""
        return False

    def first_stage_problem(self, cfg: Config) -> str | None:
        """Why `cfg` cannot be stage 1 of a sequential recipe (whose stage 2 continues its adapter), or None."""
        return None

    # --- the run

    def run(self, cfg: Config, *, hooks: TrainHooks | None = None, **options: Any) -> RunResult:
        """Train one run end to end and write its run directory; rerunning the same config resumes it."""
        raise NotImplementedError(f"method {self.name!r} has no run")

    def beside_workers(self, cfg: Config) -> list[Any]:
        """`uft_ray.resources.Demand`s of what holds cluster resources beside the training workers while they
        train (actors of the method's own), not counting the data tasks."""
        return []

    def backends(self, cfg: Config) -> list[Any]:
        """`uft_ray.preflight.BackendNeed`s: packages the method's actors import, checked on the nodes before
        any work."""
        return []

    # --- what the user sees

    def summary_line(self, cfg: Config) -> str:
        """One line saying what the run trains (`uft-ray train` and `validate` print it)."""
        tr = cfg.train
        return (
            f"model {cfg.model.path}; {self.name}; {tr.num_workers} {'GPU' if tr.use_gpu else 'CPU'} workers; "
            f"run dir {cfg.output.run_dir}"
        )

    def progress(self, row: dict[str, Any]) -> list[str]:
        """The method's parts of the CLI's one line per step, from one metrics row (what it lacks is left out)."""
        return []

    def write_report(self, inp: RunInputs) -> str | None:
        """Write the run's report.html (uft_ray.report) and return its path; None: the shared page alone."""
        return None

    # --- the demo (`uft-ray demo --method NAME`)

    def demo_config(self, tiny: bool) -> Path | None:
        """The embedded demo config (the real model's, or the tiny toy's); None: no demo."""
        return None

    def demo_overrides(self, root: str, tiny: bool) -> list[str]:
        """Make the demo's assets under `root` and point the demo config at them."""
        return []

    def demo_text(self, cfg: Config) -> str:
        """What the demo run does, in a sentence or two."""
        return ""

    def demo_checks(self, cfg: Config, root: str) -> int:
        """After a real-model demo run: the checks it prints; returns the exit code."""
        return 0


class UnknownMethod(KeyError):
    """No method of this name is registered, built in or installed."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no method {self.name!r}; registered: {', '.join(names())}"


def register(method: Method, *, replace: bool = False) -> Method:
    """Make `method` known by `method.name`; another method already known by that name is an error unless
    `replace`. Returns the method (usable as a decorator on an instance's factory)."""
    name = getattr(method, "name", "")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method's name must be an identifier, got {name!r}")
    known = _METHODS.get(name)
    if known is not None and known is not method and not replace and type(known) is not type(method):
        raise ValueError(f"method {name!r} is already registered ({type(known).__qualname__})")
    _METHODS[name] = method
    return method


def unregister(name: str) -> None:
    """Forget a method registered by `register` (a built-in one comes back on its next `get`)."""
    _METHODS.pop(name, None)


def find(name: str) -> Method | None:
    """The method called `name`, or None: registered, built in (imported now), or an installed entry point."""
    if name not in _METHODS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])  # the module registers it
    if name not in _METHODS:
        for ep in _installed():
            if ep.name == name:
                loaded = ep.load()
                register(loaded() if isinstance(loaded, type) else loaded)
    return _METHODS.get(name)


def get(name: str) -> Method:
    """The method called `name`; `UnknownMethod` naming the known ones when there is none."""
    method = find(name)
    if method is None:
        raise UnknownMethod(name)
    return method


def of(cfg: Config) -> Method:
    """The method a config runs (`cfg.method`)."""
    return get(cfg.method)


def names() -> tuple[str, ...]:
    """Every method name a config may give: built in first, then registered, then installed entry points."""
    out = [*_BUILTIN, *(n for n in _METHODS if n not in _BUILTIN)]
    out += [ep.name for ep in _installed() if ep.name not in out]
    return tuple(out)


@functools.cache
def _installed() -> tuple[importlib.metadata.EntryPoint, ...]:
    """The installed packages' method entry points (read once: validation asks for the names of every config)."""
    return tuple(importlib.metadata.entry_points(group=ENTRY_POINTS))
