"""Build a backbone without allocating its weights, for loading (every backend).

This is the one module of keras_gemma2 that touches Keras internals
(`keras.src`); `tests/checkpoints/test_unallocated.py` fails loudly if they
move. Variables created in `keras.StatelessScope(initialize_variables=False)`
hold no value until assigned, but Keras also lists them as pending: the next
`StatelessScope` to close would initialise them again and fail ("already
initialized"). `forget_pending` takes loaded variables off that list.
"""

import contextlib

import keras
import numpy as np
from keras.src.backend.common import global_state
from keras.src.initializers.random_initializers import RandomInitializer

_PENDING = "uninitialized_variables"


def build_unallocated(factory):
    """Call `factory()` with variable allocation deferred to first assignment."""
    with keras.StatelessScope(initialize_variables=False):
        return factory()


def build_zero_initialized(factory):
    """Call `factory()`; its randomly initialised variables start at zero.

    For objects whose every weight is assigned right after (a preset's
    load). Drawing random initial values costs more than loading a small
    model: on JAX each new shape traces and compiles a program, and the
    `gemma2_tiny_python` load spent about half its time there. Variables
    with other initializers (constants, a seed generator's state) get their
    own values, as without this.
    """
    before = {id(variable) for variable in pending_variables()}
    with keras.StatelessScope(initialize_variables=False):
        result = factory()
    created = [v for v in pending_variables() if id(v) not in before]
    for variable in created:
        if isinstance(variable._initializer, RandomInitializer):
            variable._initialize(np.zeros(variable.shape, np.dtype(variable.dtype)))
            variable._initializer = None
        else:
            variable._deferred_initialize()
    forget_pending(created)
    return result


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
    into the backend), never holding random weights first. As a backend
    tensor: JAX's `_initialize` keeps what it is given, and a numpy value
    would be copied into every jitted call that reads the variable.
    """
    if variable._value is None:
        variable._initialize(variable._convert_to_tensor(value, dtype=variable.dtype))
        variable._initializer = None
    else:
        variable.assign(value)


@contextlib.contextmanager
def pending_set_aside():
    """While open, Keras' list of pending variables is empty.

    A `StatelessScope` that closes inside (building a throwaway model)
    initialises none of the variables a load is about to fill; those
    created inside join the list as usual.
    """
    pending = pending_variables()
    global_state.set_global_attribute(_PENDING, [])
    try:
        yield
    finally:
        added = pending_variables()
        global_state.set_global_attribute(_PENDING, pending + added)


def pending_variables():
    """Variables Keras will initialise at the next closing `StatelessScope`."""
    return list(global_state.get_global_attribute(_PENDING) or [])
