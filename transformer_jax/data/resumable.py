"""Resume state shared by the in-memory batch iterators (char windows, sentences).

Each iterator derives batch ``i`` from its seed and ``i`` alone, so its whole state is
the number of batches drawn, saved with a ``_spec`` that says which data and shapes
that count refers to; restoring into an iterator whose spec differs is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_STATE_VERSION = 1


class CountedBatches:
  """Mixin: ``get_state``/``set_state`` over ``self._batches`` and ``self._spec()``."""

  _batches: int

  def _spec(self) -> dict[str, Any]:
    raise NotImplementedError

  def get_state(self) -> dict[str, Any]:
    return {'version': _STATE_VERSION, 'spec': self._spec(), 'batches': self._batches}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get('version') != _STATE_VERSION or state.get('spec') != self._spec():
      raise ValueError(f'The saved data iterator state does not fit this input pipeline '
                       f'(saved {state.get("spec")}, now {self._spec()}); the data '
                       'config or corpus changed since the checkpoint.')
    self._batches = int(state['batches'])

  def close(self) -> None:
    pass
