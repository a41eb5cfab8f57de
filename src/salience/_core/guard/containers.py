"""The contents of a module's lists, dicts, sets and ``collections`` containers: copied, compared, put back in place.

A forward that appends to ``self.history`` or sets ``self.cfg["k"]`` keeps the object, so the copy of the module's
``__dict__`` cannot tell; :func:`container_records` copies the contents of each list, dict, set, ``deque`` (its
``maxlen`` stays the object's), ``defaultdict`` (its ``default_factory`` too), ``Counter`` and ``OrderedDict`` (exact
types: a subclass, a log of the user's, is not copied) up to :data:`CONTENTS_LIMIT` items (1024), and the containers
inside one of them, one level more, where their items fit too. The tensors among their items are recorded as the
attributes' tensors (:mod:`~salience._core.guard.records`). :func:`same_contents` compares in C, each item by
identity first; :func:`put_back_containers` and :func:`restore_mapping` put the contents back in place, an item both
have never missing meanwhile (another thread may be reading the object).

Limits: a container over the limit keeps what a call did to it (told by a warning where its length changed); a list
in a list in a dict is not copied, nor a tensor in a tuple in a tuple in a dict."""
from __future__ import annotations

import operator
from collections import Counter, OrderedDict, defaultdict, deque
from typing import Any, Optional

import torch
from torch import nn

from salience._core.guard.values import array_types


def restore_mapping(now: dict, saved: dict) -> None:
    """Put the dict ``now`` (a module's ``__dict__``, ``_parameters``, ``_modules`` or ``_buffers``) back to ``saved``,
    its copy: the keys added since deleted, those deleted put back, the values replaced since put back (by identity),
    in the saved order. A key both have is never taken out, even for an instant: clearing and refilling the dict left
    it empty between the two calls, and the user's own thread running the model meanwhile failed at random ("object
    has no attribute '_backward_hooks'", or a layer's name; ``tests/test_guard_gaps.py``). Only where the order
    differs (a key the block deleted, put back at the end) are the keys after the first one out of place moved back
    behind it (each taken out and put back). The caller compares ``now != saved`` first (in C, each value by identity
    first): a value replaced by one equal to it (a number, a string) stays."""
    for k in [k for k in list(now) if k not in saved]:  # list(): a copy made in C, at once (another thread may add)
        now.pop(k, None)
    for k, v in saved.items():
        if now.get(k, MISSING) is not v:
            now[k] = v
    keys, order = list(saved), list(now)
    if order != keys:  # a key put back at the end: the ones after its place moved behind it, in order
        first = next(i for i, (a, b) in enumerate(zip(order, keys)) if a != b)
        for k in keys[first:]:
            now.pop(k, None)
            now[k] = saved[k]


def copy_contents(v: Any) -> Any:
    """A copy of a list's, dict's or set's contents, or of ``collections``' ``deque`` (its ``maxlen`` too),
    ``defaultdict`` (its ``default_factory`` too), ``Counter`` or ``OrderedDict`` (a forward may change them in place;
    ``self.recent.append(y)`` on a running window), of the same exact type (an OrderedDict's as a
    dict); else ``None`` (a subclass of one: a log of the user's, not copied)."""
    t = type(v)
    if t in _PLAIN_CONTAINERS:  # list, dict, set, Counter (Counter(v): dict.update, in C)
        return t(v)
    if t is OrderedDict:  # a plain dict: an OrderedDict's copy and comparison cost 40 us more at 1024 items
        return dict(v)
    if t is deque:
        return deque(v, v.maxlen)
    return defaultdict(v.default_factory, v) if t is defaultdict else None


def same_contents(items: Any, v: Any, identity: bool = False) -> bool:
    """Whether the container ``v`` holds ``items`` (:func:`copy_contents`), a dict in the same order; ``items`` an int (a
    container over :data:`CONTENTS_LIMIT` items, not copied): whether it still has that many. Compared in C, each
    item by identity first, as the attributes are (an item replaced by one equal to it, ``==``, stays; one whose
    ``==`` raises, a tensor's, is changed): item by item in Python (``operator.is_``, a generator) a module's record
    and put-back with 1024 items would cost 37 us more a call for a list, 100 for a dict, against 2.5 and 22 (AMD EPYC,
    core 0, ``benchmarks/guard-containers-rvrecord-s49.txt``). ``identity``: each item by identity, no ``==``
    called (:func:`state_changes`: the fx trace's record of its shadow may hold proxies)."""
    if type(items) is int:
        return len(v) == items
    if isinstance(items, dict):  # a dict, OrderedDict, Counter (its == counts a missing key as 0) or defaultdict
        if type(items) is defaultdict and items.default_factory is not v.default_factory:
            return False
        if identity:  # no == called on an item (a trace's record of its shadow: an fx proxy's == adds a node)
            return len(items) == len(v) and all(map(operator.is_, items, v)) and \
                all(map(operator.is_, items.values(), v.values()))
    elif identity:
        if type(items) is set:
            return items == v  # by hash (an fx proxy cannot be in one)
        return len(items) == len(v) and all(map(operator.is_, items, v))  # a list, a deque
    try:
        if isinstance(items, dict):  # its keys in order (an LRU cache's move_to_end, ``d[k] = d.pop(k)``),
            # by lists: in C, and a Counter's own == (Python, a key of 0 counted missing) not called
            return len(items) == len(v) and list(items) == list(v) and list(items.values()) == list(v.values())
        return items == v  # a list's, set's, deque's: in C
    except Exception:  # noqa: BLE001 - an item's == raised (a tensor put in another's place): changed
        return False


def _put_back_contents(v: Any, items: Any) -> None:
    """The container ``v`` holding ``items`` (:func:`copy_contents`) again, in place (the object stays the user's), an
    item both have never missing meanwhile: ``clear()`` then refilling would leave it empty for that moment, and the
    user's other thread reading it (its own forward) would fail; a dict's order put back too
    (:func:`restore_mapping`); a deque's (its ``maxlen`` stays the object's) by adding the items at its right then
    dropping those before them, a defaultdict's ``default_factory`` too."""
    t = type(v)
    if t is list:
        v[:] = items
    elif t is set:
        v.intersection_update(items)
        v.update(items)
    elif t is deque:
        v.extend(items)  # in C; over its maxlen the oldest go at once
        for _ in range(len(v) - len(items)):
            v.popleft()
    else:
        restore_mapping(v, items)
        if t is defaultdict and v.default_factory is not items.default_factory:
            v.default_factory = items.default_factory


def container_records(attrs: dict, every: bool = False, items: Optional[dict] = None) -> Any:
    """The lists, dicts, sets and ``collections``' deques, defaultdicts, Counters and OrderedDicts (:data:`_CONTAINERS`,
    exact types) among a module's plain attributes ``attrs`` (its ``__dict__`` or a copy; nn.Module's own dicts left
    out), each ``(name, container, a copy of its contents)``, or :data:`NO_TENSORS`. Over :data:`CONTENTS_LIMIT`
    items, unless ``every``, the length instead of a copy (its cost per call): a change of length is told
    (:func:`put_back_containers`), the contents stay. The names past nn.Module's own found in C first (most modules: a
    few numbers). ``items``: filled with the tensors among the items of the containers copied (not a set's), by the
    name ``"name[index]"`` / ``"name[key]"`` (:func:`_item_tensors`). A tuple (a namedtuple too) has no record of its
    own (its items cannot change), but its items are looked into as a list's (``self.pair[0].add_(1)``, a list in a
    tuple appended to), within the same item limit."""
    found = []
    for k in attrs.keys() - _MODULE_KEYS:
        v = attrs[k]
        if type(v) in _CONTAINERS:
            n = len(v)
            if not every and n > CONTENTS_LIMIT:
                found.append((k, v, n))
                continue
            found.append((k, v, copy_contents(v)))
            if n and type(v) is not set:  # a set holds no container (unhashable)
                found += _inner_records(k, v, every, CONTENTS_LIMIT - n, items)
        elif isinstance(v, tuple) and v and (every or len(v) <= CONTENTS_LIMIT):
            found += _inner_records(k, v, every, CONTENTS_LIMIT - len(v), items)
    return tuple(found) or NO_TENSORS


def _item_tensors(k: str, v: Any, kinds: set, into: Optional[dict]) -> None:
    """The plain tensors among the items of the container ``v`` (the attribute ``k``; ``kinds``, its items' types) put in
    ``into`` by the names ``"k[index]"`` / ``"k[key]"``: a forward that writes one in place (``self.cache[0].add_(1)``)
    keeps the object, which the container's copy compares by identity; recorded as the attributes' tensors
    (:func:`tensor_records`: version counter and copy)."""
    arrays = array_types()
    if into is None or not any(issubclass(t, torch.Tensor) or t in arrays for t in kinds):
        return
    pairs = v.items() if isinstance(v, dict) else enumerate(v)
    into.update((f"{k}[{key!r}]", u) for key, u in pairs if isinstance(u, torch.Tensor) or type(u) in arrays)


def _inner_records(k: str, v: Any, every: bool, room: int, tensors: Optional[dict] = None) -> list:
    """The containers (:data:`_CONTAINERS`) among the items of the container ``v`` (the attribute ``k``; a dict's
    values), one level more (a deque of a running window inside a dict, ``self.state["recent"].append(y)``:
    its dict compares its items by identity, so it cannot tell a change inside one), each ``(k, container, a copy of its
    contents)``, after its parent's record (put back after it: the parent gives the container back first). Unless
    ``every``, only where their items fit in ``room`` (:data:`CONTENTS_LIMIT` less the parent's), else none: one
    level as before. Looking at the items' types costs about 65 ns an item (67 us for 1024 on an AMD EPYC, core 0,
    against 1.3 us for the parent's copy), paid where the parent is copied."""
    items = v.values() if isinstance(v, dict) else v
    kinds = set(map(type, items))  # in C: most containers hold numbers, strings, tensors
    _item_tensors(k, v, kinds, tensors)
    tuples = not all(map(_not_tuple, kinds))  # a tuple's tensors (``self.cache["kv"] = (k, v)``)
    if _CONTAINERS.isdisjoint(kinds) and not tuples:
        return []
    inner = [u for u in items if type(u) in _CONTAINERS]
    if not every and sum(map(len, inner)) + (sum(len(u) for u in items if isinstance(u, tuple)) if tuples else 0) > room:
        return []
    if tensors is not None:  # the tensors among an inner container's items (``self.state["cache"][0].add_(1)``)
        for key, u in v.items() if isinstance(v, dict) else enumerate(v):
            if type(u) in _CONTAINERS and type(u) is not set or isinstance(u, tuple):
                _item_tensors(f"{k}[{key!r}]", u, set(map(type, u.values() if isinstance(u, dict) else u)), tensors)
    return [(k, u, copy_contents(u)) for u in inner]


def _not_tuple(t: type) -> bool:
    """Whether the type ``t`` is no tuple (a namedtuple is one)."""
    return not issubclass(t, tuple)


def put_back_containers(records: Any) -> tuple[Any, list]:
    """The containers of ``records`` (:func:`container_records`) changed in place since, their contents put back;
    ``(the records, with the lengths now of those not copied, the (name, container) of each such one that changed)``:
    a container over the limit keeps what the call did to it, told (:func:`tell_not_put_back`)."""
    lost = []
    for k, v, items in records:
        if not same_contents(items, v):
            if type(items) is int:
                lost.append((k, v))
            else:
                _put_back_contents(v, items)
    if lost:
        records = tuple((k, v, len(v) if type(items) is int else items) for k, v, items in records)
    return records, lost


NO_TENSORS: tuple = ()
_MODULE_KEYS = frozenset(nn.Module().__dict__)  # every attribute nn.Module.__init__ sets
# the containers whose contents the records copy (:func:`copy_contents`), and the most items the model guard copies of one
# (a shallow copy and a comparison in C: 1024 items cost a module's record and put-back about 2.5 us more a call for a
# list, 8 for a set, 22 for a dict, its order compared too: AMD EPYC, core 0, benchmarks/guard-containers-rvrecord-s49.txt)
# collections' deque, defaultdict and Counter too, by their exact types (a forward's ``self.recent.append(y)`` on a
# deque); a subclass of any is not copied (a log of the user's). A
# deque of 1024 costs 14 us more a call unchanged (its == and copy; a list's 2.5), defaultdict and Counter as a dict's
# (AMD EPYC, core 0, benchmarks/guard-containers-stdc-s49.txt)
_PLAIN_CONTAINERS = frozenset({list, dict, set, Counter})
_CONTAINERS = _PLAIN_CONTAINERS | {OrderedDict, deque, defaultdict}
CONTENTS_LIMIT = 1024
MISSING = object()
