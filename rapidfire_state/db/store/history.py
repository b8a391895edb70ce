"""Reading the ``state_transitions`` history of one row."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Connection

from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import TransitionRecord
from rapidfire_state.db.schema import TRANSITION_ENTITIES
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.lookups import check_id
from rapidfire_state.db.store.status_change import ENTITIES
from rapidfire_state.exceptions import ConfigError, NotFoundError


class HistoryStore(StoreCore):
    """The history method of :class:`~rapidfire_state.db.StateDB`."""

    def history(self, entity: str, entity_id: int) -> list[TransitionRecord]:
        """Every status change of one row, oldest first (creation has ``from_status`` None)."""
        if entity not in TRANSITION_ENTITIES:
            raise ConfigError(f"history entity {entity!r} is not valid; allowed: {', '.join(TRANSITION_ENTITIES)}")
        check_id(f"{entity}_id", entity_id)
        target = ENTITIES[entity]
        table = tables.state_transitions

        def unit(conn: Connection) -> list[TransitionRecord]:
            rows = conn.execute(
                select(table)
                .where(table.c.entity == entity, table.c.entity_id == entity_id)
                .order_by(table.c.transition_id)
            ).mappings().all()
            if not rows and conn.execute(
                select(target.key_column).where(target.key_column == entity_id)
            ).first() is None:
                raise NotFoundError(entity, entity_id)
            return [TransitionRecord.from_row(r) for r in rows]

        return self._read(unit)
