"""Forget cached data when the rows it was computed from change.

``invalidate_on(Product)`` invalidates the tags ``model_tag(Product)`` and ``instance_tag(product)``
whenever a product is saved, deleted or has its many-to-many relations changed.
``RUSTCACHE_AUTO_INVALIDATE = True`` does the same for every model. Writes that send no signal go
through ``InvalidatingQuerySet``/``InvalidatingManager`` or ``invalidate_model(Model)``.

Inside ``transaction.atomic()`` every invalidation runs at once (so the writing thread never reads
its own stale entry) and again when the transaction ends: on commit (entries other threads filled
from the old rows meanwhile), or on rollback (entries filled from the rolled-back rows).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, models, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save

logger = logging.getLogger("django_rustcache")

#: A tag or key given to ``invalidate_on``: a string, or a callable of the instance returning a
#: string, an iterable of strings or None.
Spec = str | Callable[[Any], Any]
ModelRef = type[models.Model] | str

_rules: dict[type, list[_Rule]] = {}
_auto_rule: _Rule | None = None
#: Set while ``bulk_update`` runs: Django's implements it with ``update()``, which stays quiet.
_in_bulk_update: ContextVar[bool] = ContextVar("rustcache_in_bulk_update", default=False)


def model_tag(model: type[models.Model] | models.Model) -> str:
    """The tag of a whole model, e.g. ``"shop.product"``; proxies share their concrete model's."""
    return model._meta.concrete_model._meta.label_lower


def instance_tag(instance: models.Model) -> str:
    """The tag of one row, e.g. ``"shop.product:42"``."""
    if instance.pk is None:
        raise ValueError(f"{instance!r} has no primary key, so it has no instance tag.")
    return f"{model_tag(instance)}:{instance.pk}"


def versioned_key(instance: models.Model, *parts: Any, field: str | None = None) -> str:
    """A key that changes whenever the row does, e.g. ``"blog.article:42:v3:body"``.

    Uses ``field`` if given, else a ``version`` field, else ``updated_at``; a model with neither
    gets ``"blog.article:42"`` plus the parts, which only invalidation keeps fresh.
    """
    names = {f.name for f in instance._meta.concrete_fields}
    field = field or next((n for n in ("version", "updated_at") if n in names), None)
    key = instance_tag(instance)
    if field is not None:
        value = getattr(instance, field)
        key += f":v{value.isoformat() if hasattr(value, 'isoformat') else value}"
    return ":".join([key, *map(str, parts)])


@dataclass(frozen=True)
class _Rule:
    """What to invalidate, in which cache, when instances of the models it is registered for change.

    ``tags`` and ``keys`` of None both mean the default: model tags and instance tags.
    """

    tags: tuple[Spec, ...] | None
    keys: tuple[Spec, ...] | None
    cache: str
    exclude: frozenset[str] = frozenset()

    @property
    def is_default(self) -> bool:
        return self.tags is None and self.keys is None

    @property
    def needs_rows(self) -> bool:
        """Whether the tags or keys read fields of the instance (so a bare pk will not do)."""
        return any(callable(spec) for spec in (self.tags or ()) + (self.keys or ()))

    def applies_to(self, model: type[models.Model]) -> bool:
        return not {model._meta.app_label, model._meta.label_lower} & self.exclude

    def targets(
        self, model: type[models.Model], instances: Sequence[models.Model]
    ) -> tuple[list[str], list[str]]:
        """The tags and keys to invalidate for these instances (no instances: the model only)."""
        if self.is_default:
            return _model_tags(model) + [_tag for i in instances for _tag in _instance_tags(i)], []
        return _expand(self.tags or (), instances), _expand(self.keys or (), instances)


def _model_tags(model: type[models.Model]) -> list[str]:
    """The model's tag and those of its multi-table parents (whose rows a save also writes)."""
    return [model_tag(m) for m in (model, *model._meta.get_parent_list())]


def _instance_tags(instance: models.Model) -> list[str]:
    parents = instance._meta.get_parent_list()
    return [f"{model_tag(m)}:{instance.pk}" for m in (type(instance), *parents)]


def _expand(specs: Iterable[Spec], instances: Sequence[models.Model]) -> list[str]:
    """Strings as they are; callables once per instance (skipped when there is no instance)."""
    out: list[str] = []
    for spec in specs:
        if isinstance(spec, str):
            out.append(spec)
            continue
        for instance in instances:
            value = spec(instance)
            if value is not None:
                out.extend([value] if isinstance(value, str) else value)
    return out


def _as_specs(value: Spec | Iterable[Spec] | None) -> tuple[Spec, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) or callable(value) else tuple(value)


def _resolve_model(model: ModelRef) -> type[models.Model]:
    if isinstance(model, str):
        from django.apps import apps

        return apps.get_model(model)
    return model


def _register(model: type, rule: _Rule) -> None:
    _connect_receivers()
    _rules.setdefault(model, []).append(rule)


def _rules_for(model: type) -> list[_Rule]:
    """Rules registered on the model, its parents, proxied models, abstract bases or ``Model``.

    Auto-created many-to-many tables get none: ``m2m_changed`` covers them.
    """
    if model._meta.auto_created:
        return []
    return [rule for cls in model.__mro__ for rule in _rules.get(cls, ()) if rule.applies_to(model)]


def invalidate_on(
    *models_: ModelRef,
    tags: Spec | Iterable[Spec] | None = None,
    keys: Spec | Iterable[Spec] | None = None,
    cache: str = "default",
) -> Any:
    """Invalidate ``tags`` and ``keys`` (strings, or callables of the instance) in ``cache``
    whenever an instance of one of ``models_`` is saved, deleted or its many-to-many relations
    change (either side). With neither, the model tag and the instance tag are invalidated.

    Call it in ``AppConfig.ready()`` (``invalidate_on(Product, tags=["menu"])``) or use it as a
    class decorator (``@invalidate_on()``, ``@invalidate_on(tags=[...])`` or bare
    ``@invalidate_on``). Rules on an abstract base or a parent cover its subclasses.
    """
    rule = _Rule(_as_specs(tags), _as_specs(keys), cache)
    for model in models_:
        _register(_resolve_model(model), rule)

    def decorate(model: type[models.Model]) -> type[models.Model]:
        _register(model, rule)
        return model

    if len(models_) == 1 and rule.is_default and cache == "default":
        return models_[0]  # bare ``@invalidate_on`` on a class: give the class back
    return decorate


def configure_auto_invalidation() -> None:
    """(Re)apply ``RUSTCACHE_AUTO_INVALIDATE`` and ``RUSTCACHE_AUTO_INVALIDATE_EXCLUDE``.

    ``True`` (or a cache alias) gives every model the default rule, except the app labels or
    ``"app_label.Model"`` names in the exclude list. Called from ``AppConfig.ready()`` and when
    those settings change (``override_settings``).
    """
    global _auto_rule
    if _auto_rule is not None:
        _rules[models.Model].remove(_auto_rule)
        _auto_rule = None
    alias = getattr(settings, "RUSTCACHE_AUTO_INVALIDATE", False)
    if not alias:
        return
    exclude = getattr(settings, "RUSTCACHE_AUTO_INVALIDATE_EXCLUDE", ())
    _auto_rule = _Rule(
        None,
        None,
        "default" if alias is True else alias,
        frozenset(label.lower() for label in exclude),
    )
    _register(models.Model, _auto_rule)


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting.startswith("RUSTCACHE_AUTO_INVALIDATE"):
        configure_auto_invalidation()


setting_changed.connect(_on_setting_changed, dispatch_uid="django_rustcache.auto_invalidate")


# Writes --------------------------------------------------------------------------------------


def invalidate_model(model: ModelRef, *, cache: str = "default", using: str | None = None) -> None:
    """Invalidate the model tag in ``cache``, plus every rule's fixed tags and keys for the model.

    For writes that send no signal (raw SQL, ``QuerySet.update`` without the mixin). Callable
    tags and keys need an instance, so they are not reached: tag such entries with the model tag.
    """
    model = _resolve_model(model)
    _invalidate_rows(model, [], "invalidate_model", using, {cache: _model_tags(model)})


def _invalidate_rows(
    model: type[models.Model],
    instances: Sequence[models.Model],
    signal: str,
    using: str | None,
    extra: dict[str, list[str]] | None = None,
) -> None:
    """Invalidate what every rule for ``model`` names for ``instances``, one call per cache."""
    plan: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for alias, tags in (extra or {}).items():
        plan.setdefault(alias, ({}, {}))[0].update(dict.fromkeys(tags))
    for rule in _rules_for(model):
        tags, keys = rule.targets(model, instances)
        entry = plan.setdefault(rule.cache, ({}, {}))
        entry[0].update(dict.fromkeys(tags))
        entry[1].update(dict.fromkeys(keys))
    what = {"model": model._meta.label_lower, "pk": _pks(instances), "signal": signal}
    for alias, (tags, keys) in plan.items():
        if tags or keys:
            _invalidate(alias, list(tags), list(keys), what, using or DEFAULT_DB_ALIAS)


def _pks(instances: Sequence[models.Model]) -> Any:
    pks = [i.pk for i in instances]
    if len(pks) > 10:
        return f"{pks[:10]} and {len(pks) - 10} more"
    return pks[0] if len(pks) == 1 else pks


def _invalidate(alias: str, tags: list[str], keys: list[str], what: dict, using: str) -> None:
    """Invalidate now and, inside a transaction, again when it commits or rolls back."""

    def run(when: str) -> None:
        cache = caches[alias]
        if tags:
            # Our backends' `_invalidate_tags` skips the line `invalidate_tags` logs: one DEBUG
            # line per event. Any other backend offering `invalidate_tags` works too.
            quiet = getattr(cache, "_invalidate_tags", None)
            if quiet is not None:
                quiet(tuple(tags))
            else:
                cache.invalidate_tags(list(tags))
        if keys:
            cache.delete_many(keys)
        logger.debug(
            "invalidated tags=%s keys=%s cache=%s model=%s pk=%s signal=%s when=%s",
            tags,
            keys,
            alias,
            what["model"],
            what["pk"],
            what["signal"],
            when,
            extra={"rustcache": {**what, "tags": tags, "keys": keys, "when": when}},
        )

    run("now")
    if transaction.get_connection(using).in_atomic_block:
        transaction.on_commit(_at_transaction_end(run), using=using, robust=True)


def _at_transaction_end(run: Callable[[str], None]) -> Callable[[], None]:
    """An on_commit callback that runs ``run("commit")``, or ``run("rollback")`` when Django
    drops it because its transaction or savepoint rolled back (Django has no rollback hook,
    so a finalizer on the dropped callback stands in for one).
    """
    phase = ["rollback"]

    def at_commit() -> None:
        phase[0] = "commit"
        finalizer()

    finalizer = weakref.finalize(at_commit, lambda: run(phase[0]))
    finalizer.atexit = False
    return at_commit


# Signal receivers ----------------------------------------------------------------------------


def _connect_receivers() -> None:
    uid = "django_rustcache.invalidation"
    post_save.connect(_on_write, dispatch_uid=uid + ".post_save")
    post_delete.connect(_on_write, dispatch_uid=uid + ".post_delete")
    m2m_changed.connect(_on_m2m_changed, dispatch_uid=uid + ".m2m_changed")


def _on_write(sender: type, instance: models.Model, signal: Any, **kwargs: Any) -> None:
    name = "post_save" if signal is post_save else "post_delete"
    _invalidate_rows(type(instance), [instance], name, kwargs.get("using"))


def _on_m2m_changed(
    sender: type,
    instance: models.Model,
    action: str,
    reverse: bool,
    model: type[models.Model],
    pk_set: set[Any] | None,
    using: str,
    **kwargs: Any,
) -> None:
    """Invalidate both sides: ``instance`` and the ``model`` rows added, removed or cleared."""
    if action == "pre_clear" and _rules_for(model):
        pks = _related_pks(sender, instance, model, reverse, using)
        instance.__dict__["_rustcache_cleared"] = (sender, pks)
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    _invalidate_rows(type(instance), [instance], "m2m_changed", using)
    if action == "post_clear":
        through, pk_set = instance.__dict__.pop("_rustcache_cleared", (None, set()))
        pk_set = pk_set if through is sender else set()
    if pk_set and _rules_for(model):
        rows = _rows(model, pk_set, using)
        _invalidate_rows(model, rows, "m2m_changed", using)


def _related_pks(
    through: type, instance: models.Model, model: type, reverse: bool, using: str
) -> set[Any]:
    """The pks of ``model`` rows linked to ``instance`` by ``through`` (read before a clear)."""
    owner = model if reverse else type(instance)
    field = next(f for f in owner._meta.many_to_many if f.remote_field.through is through)
    mine, theirs = field.m2m_field_name(), field.m2m_reverse_field_name()
    if reverse:
        mine, theirs = theirs, mine
    rows = through._default_manager.using(using).filter(**{mine: instance.pk})
    return set(rows.values_list(theirs, flat=True))


def _rows(model: type[models.Model], pks: Iterable[Any], using: str | None) -> list[models.Model]:
    """Instances for ``pks``: read from the database only if a rule needs more than the pk."""
    if any(rule.needs_rows for rule in _rules_for(model)):
        return list(model._base_manager.using(using).filter(pk__in=list(pks)))
    return [model(pk=pk) for pk in pks]


# QuerySet / Manager mixin ----------------------------------------------------------------------


class InvalidatingQuerySet(models.QuerySet):
    """A QuerySet whose ``update``, ``bulk_create``, ``bulk_update`` and ``delete`` invalidate
    the model tag (in ``invalidation_cache``) and what the model's rules name for the rows.

    ``update`` reads the matching pks first when rules exist, so instance tags are reached too.
    """

    invalidation_cache = "default"

    def _written(self, rows: Sequence[models.Model], signal: str) -> None:
        extra = {self.invalidation_cache: _model_tags(self.model)}
        _invalidate_rows(self.model, rows, signal, self.db, extra)

    def update(self, **kwargs: Any) -> int:
        if _in_bulk_update.get():
            return super().update(**kwargs)
        pks = list(self.values_list("pk", flat=True)) if _rules_for(self.model) else []
        count = super().update(**kwargs)
        self._written(_rows(self.model, pks, self.db), "update")
        return count

    def bulk_create(self, objs: Iterable[models.Model], *args: Any, **kwargs: Any) -> list:
        created = super().bulk_create(objs, *args, **kwargs)
        self._written([obj for obj in created if obj.pk is not None], "bulk_create")
        return created

    def bulk_update(self, objs: Iterable[models.Model], *args: Any, **kwargs: Any) -> int:
        objs = list(objs)
        token = _in_bulk_update.set(True)
        try:
            count = super().bulk_update(objs, *args, **kwargs)
        finally:
            _in_bulk_update.reset(token)
        self._written(objs, "bulk_update")
        return count

    def delete(self) -> tuple[int, dict[str, int]]:
        deleted = super().delete()
        self._written([], "delete")
        return deleted


class InvalidatingManager(models.Manager.from_queryset(InvalidatingQuerySet)):
    """``objects = InvalidatingManager()``: a Manager over ``InvalidatingQuerySet``."""
