"""The control plane assembled: one :class:`~control.core.Core` and its three faces,
:class:`~control.commands.Commands` (change the desired state),
:class:`~control.views.Views` (read it) and :class:`~control.runtime.Runtime`
(start-up, reconciles, health verdicts, the clock)."""

from __future__ import annotations

from dataclasses import dataclass

from control.commands import Commands
from control.core import Core
from control.reconcile import DatapathPort
from control.runtime import Runtime
from control.store import DesiredState, Store
from control.views import Views
from lb.config import Config

__all__ = ["ControlPlane", "open_plane"]


@dataclass(frozen=True)
class ControlPlane:
    core: Core  # the shared state: desired state, verdicts, tables, port, lock
    commands: Commands
    views: Views
    runtime: Runtime


def open_plane(port: DatapathPort, store: Store | None, seed: Config | None = None,
               from_config: bool = False, loaded: DesiredState | None = None) -> ControlPlane:
    """:meth:`Runtime.open` (state reconciled onto ``port``) with commands and views over it."""
    runtime = Runtime.open(port, store, seed, from_config, loaded)
    core = runtime.core
    return ControlPlane(core, Commands(core, runtime.clock), Views(core), runtime)
