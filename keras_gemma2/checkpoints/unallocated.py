"""Build a backbone without allocating its weights, for loading (every backend).

This is the one module of keras_gemma2 that touches Keras internals
(`keras.src`); `tests/checkpoints/test_unallocated.py` fails loudly if they
move. Variables created in `keras.StatelessScope(initialize_variables=False)`
hold no value until assigned, but Keras also lists them as pending: the next
`StatelessScope` to close would initialise them again and fail ("already
initialized"). `forget_pending` takes loaded variables off that list.
"""

import keras
from keras.src.backend.common import global_state

_PENDING = "uninitialized_variables"


def build_unallocated(factory):
    """Call `factory()` with variable allocation deferred to first assignment."""
    with keras.StatelessScope(initialize_variables=False):
        return factory()


def forget_pending(variables):
    """Remove `variables` from Keras' list of variables awaiting initialisation."""
    pending = global_state.get_global_attribute(_PENDING) or []
    ids = {id(variable) for variable in variables}
    global_state.set_global_attribute(
        _PENDING, [variable for variable in pending if id(variable) not in ids]
    )


def fill(variable, value):
    """Give `variable` its value: the first one if unallocated, else assign.

    An unallocated variable is initialised straight from `value` (one copy
    into the backend), never holding random weights first.
    """
    if variable._value is None:
        variable._initialize(value)
        variable._initializer = None
    else:
        variable.assign(value)


def pending_variables():
    """Variables Keras will initialise at the next closing `StatelessScope`."""
    return list(global_state.get_global_attribute(_PENDING) or [])
