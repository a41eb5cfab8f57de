"""A module's hook dicts, and the hooks a guard's release sweeps.

Every hook registration takes the next key of one counter (``RemovableHandle.next_id``). A hold reads it when it
begins; where it moved when the hold leaves, :func:`drop_hooks` removes from the modules put back the hooks whose keys
are the record's or later and below the counter then, from every hook dict (:data:`_HOOK_DICTS`) and their
companions, but salience's own (:func:`_own_hook`) and the keys the module had when recorded (:func:`foreign_keys`: a
key past the counter came from another process's, a model pickled with its hooks).

Limits: torch's global module hooks are the process's and stay; a hook another thread of the user's registers
during the call on a module put back is swept too (a key says when, not by whom)."""
from __future__ import annotations

import operator
from typing import Any




def drop_hooks(attrs: dict, since: int, until: int, foreign: Any) -> None:
    """The hooks of a module (``attrs``, its ``__dict__``) whose keys (:class:`~torch.utils.hooks.RemovableHandle`
    ids, from one counter) are ``since`` or later and below ``until`` removed from each of its hook dicts, with their
    keys in the companion dicts (``with_kwargs``, ``always_called``), but salience's own and the ``foreign`` keys
    (:func:`foreign_keys`). A key past ``until`` was not given in the block either: another process's counter gave it (a
    model pickled whole with its hooks, a Ray actor's copy)."""
    for name in _HOOK_DICTS:
        hooks = attrs.get(name)
        if not hooks or not isinstance(hooks, dict):
            continue
        # a copy at once (in C): another thread may add its hook meanwhile
        for key in [k for k, h in tuple(hooks.items())
                    if type(k) is int and since <= k < until and k not in foreign and not _own_hook(h)]:
            hooks.pop(key, None)
            for companion in _COMPANIONS:
                extra = attrs.get(companion)
                if extra:
                    extra.pop(key, None)


def foreign_keys(attrs: dict, since: int) -> Any:
    """The keys of a module's hooks (``attrs``, its ``__dict__``) that are ``since`` (the counter when its state is
    recorded) or later: another process's counter gave them (a model pickled whole with the user's hooks, a Ray
    actor's copy), and this one's reaches them in some later block, which must not sweep them (:func:`drop_hooks`)."""
    try:
        dicts = HOOKS_OF(attrs)
        if not any(dicts):  # in C, as _unhook's look (most modules: none)
            return NO_KEYS
    except Exception:  # a module made without nn.Module.__init__ (a dict missing)
        return NO_KEYS
    return frozenset(k for d in dicts if isinstance(d, dict) for k in tuple(d) if type(k) is int and k >= since) \
        or NO_KEYS


def _own_hook(hook: Any) -> bool:
    """Whether ``hook`` is salience's own, which salience removes itself: scoped to its thread
    (:func:`~salience._core.autograd.this_thread`) or an observer (:func:`~salience._core.fingerprint.observer`)."""
    return getattr(hook, "salience_thread", None) is not None or getattr(hook, "salience_observer", False) is True


# every hook dict of a module; the companions hold flags under the same keys. Not torch's global module hooks
# (``register_module_forward_hook``): the process's, which any thread registers (a profiler's, for its block), and a
# key says when a hook was registered, not by whom
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_COMPANIONS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
HOOKS_OF = operator.itemgetter(*_HOOK_DICTS)
NO_KEYS: frozenset = frozenset()
ATTRS_OF = operator.attrgetter("module.__dict__")
