"""What a job's "queued" event says about its queue, in words true on any machine.

The ``gpu`` queue is where jobs with a training step go; a worker without a GPU consumes it too and trains on
its CPU, so the event names the queue and what it is for, and never claims a GPU the API cannot see.
"""

from __future__ import annotations


def queued_message(queue: str, gpu_queue: str = "gpu", cuda_queue: str = "cuda") -> str:
    """The text of a job's first event: 'queued (queue cpu)' or, for the training queues, what that means."""
    if queue == cuda_queue:
        return f"queued for a GPU worker (queue {queue!r}: a model this large trains on CUDA only)"
    if queue == gpu_queue:
        return (f"queued for a training worker (queue {queue!r}: the step trains on the worker's GPU, "
                "or on its CPU where it has none)")
    return f"queued (queue {queue!r})"
