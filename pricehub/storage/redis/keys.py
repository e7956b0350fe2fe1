"""The names of every Redis key and channel pricehub uses (``KeyLayout``).

A cluster's layout (``pricehub.storage.cluster.ClusterKeyLayout``) is this one with each
zone's names under the zone's hash tag.
"""

from __future__ import annotations

from dataclasses import dataclass

from pricehub.storage.base import IngestKeys

__all__ = ["INGEST_GROUP", "KeyLayout"]

INGEST_GROUP = "pricehub"  # the consumer group of the ingest stream


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Every Redis key and channel pricehub uses, under ``prefix``.

    Keys live in the selected database (``/N`` of the URL), but Redis Pub/Sub ignores
    the database number: a channel is shared by every client of the server. So every
    channel name also carries ``db`` (``<prefix>db<N>:prices``): two feeds on one server
    with different database numbers never hear each other, even under the same prefix.
    """

    prefix: str = "pricehub:"
    db: int = 0

    def seq(self, zone: str) -> str:
        return f"{self.prefix}seq:{zone}"

    def latest(self, zone: str) -> str:
        return f"{self.prefix}latest:{zone}"

    def history(self, zone: str) -> str:
        return f"{self.prefix}history:{zone}"

    def probe(self, token: str) -> str:
        return f"{self.prefix}db{self.db}:probe:{token}"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}instance:{instance_id}"

    def instance_mirror(self, instance_id: str) -> str:
        """The mirror id of a registered instance (``FailoverStorage``): derived from
        its registration key, so a cluster layout keeps it in the registry's slot."""
        return f"{self.instance(instance_id)}:mirror"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def restored(self) -> str:
        """The set of mirrors that wrote back into a Redis found empty (``claim_epoch``).
        Claimed in one script with the epoch, so it must share the epoch key's slot: a
        key with a hash tag keeps it, one without is made the tag."""
        epoch = self.epoch
        opening = epoch.find("{")
        if opening >= 0 and epoch.find("}", opening + 2) >= 0:
            return f"{epoch}:restored"
        return f"{{{epoch}}}:restored"

    @property
    def prices(self) -> str:
        return f"{self.prefix}db{self.db}:prices"

    @property
    def instances(self) -> str:
        return f"{self.prefix}instances"

    def ingested(self, zone: str) -> str:
        """A zone's last applied ingest entry: kept on a cluster only (its layout puts
        it in the zone's slot), where the append script checks it."""
        return f"{self.prefix}ingested:{zone}"

    @property
    def ingest(self) -> str:
        return f"{self.prefix}ingest"

    @property
    def ingest_lease(self) -> str:
        return f"{self.prefix}ingest:lease"

    @property
    def ingest_keys(self) -> IngestKeys:
        """The ingest consumer's names (``IngestSource.ingest_keys``)."""
        return IngestKeys(stream=self.ingest, lease=self.ingest_lease, group=INGEST_GROUP)
