"""The concurrent worker: an RQ worker whose tickets feed N image generations on one event loop.

The main thread runs a real RQ `SimpleWorker` (registered, visible to `rq info`, handling signals).
Each RQ job it takes is a ticket (see tickets.py); redeeming one means claiming images from the fair
schedule into free generation slots until nothing is claimable or the ticket's time slice ends.
The images themselves run as tasks on a dedicated asyncio loop in a second thread, sharing one
httpx.AsyncClient and one Redis connection pool. Leases renewed by a heartbeat let any worker
re-queue the images of a worker that died; a cancel watcher stops the images of cancelled queues.

- runtime.py: the loop thread, opening and closing it, draining a ticket into free slots
- slots.py: the generation slots, the images claimed and not yet reported
- execution.py: running one image (its spec, the provider request, the outcome)
- reporter.py: the batched reports of finished images
- duties.py: heartbeat, reaper and ticket top-up, cancel watchers, webhook deliveries
- gate.py: the back-off a provider's 429 imposes on every worker of its model
- supervisor.py: restarts a background task that failed; ends the process when one keeps failing
- rq_glue.py: the RQ side (ImageWorker, the ticket job, queue names)

RQ jobs name `redeem_ticket` by its dotted path here (tickets.TICKET_FUNC), and that path is
persisted in Redis with every waiting ticket: it must keep resolving.
"""

from app.services.queue.worker.rq_glue import ImageWorker, queue_names, redeem_ticket
from app.services.queue.worker.runtime import WorkerRuntime

__all__ = ["ImageWorker", "WorkerRuntime", "queue_names", "redeem_ticket"]
