import asyncio

from finetune_operator.workqueue import WorkQueue


def run(coro):
    return asyncio.run(coro)


def test_a_key_is_queued_once_however_many_events_name_it():
    async def scenario():
        queue = WorkQueue()
        for _ in range(5):
            queue.add("a")
        queue.add("b")
        assert len(queue) == 2
        assert await queue.get() == "a"
        assert await queue.get() == "b"
        assert len(queue) == 0
    run(scenario())


def test_a_key_added_while_worked_on_is_queued_again_after_not_handed_out_twice():
    async def scenario():
        queue = WorkQueue()
        queue.add("a")
        key = await queue.get()
        queue.add("a")  # an event arrives while a worker reconciles "a"
        assert len(queue) == 0  # no second worker may take it now
        queue.done(key)
        assert len(queue) == 1
        assert await queue.get() == "a"
    run(scenario())


def test_keys_awaiting_their_children_are_handed_out_first_and_once():
    async def scenario():
        queue = WorkQueue()
        queue.add("status-refresh")
        queue.add("moved-up")
        queue.add("new-1", first=True)
        queue.add("moved-up", first=True)  # e.g. its Job was deleted: it needs one again
        queue.add("new-2", first=True)
        queue.add("new-1")  # a later event does not move it back
        assert queue.creations_waiting
        assert len(queue) == 4
        handed = [await queue.get() for _ in range(3)]
        assert handed == ["new-1", "moved-up", "new-2"]
        assert not queue.creations_waiting
        assert await queue.get() == "status-refresh"
        assert len(queue) == 0
        # The stale entry of "moved-up" is skipped: nothing more is handed out.
        queue.add("last")
        assert await queue.get() == "last"
        # A key marked first while it was worked on comes back in the first lane.
        queue.add("busy")
        busy = await queue.get()
        queue.add("other")
        queue.add("busy", first=True)
        queue.done(busy)
        assert await queue.get() == "busy"
        assert await queue.get() == "other"
    run(scenario())


def test_the_earliest_delayed_add_wins_and_forget_cancels_it():
    async def scenario():
        queue = WorkQueue()
        queue.add_after("a", 10)
        queue.add_after("a", 0.01)
        queue.add_after("a", 5)  # later than the pending one: ignored
        assert await asyncio.wait_for(queue.get(), 1) == "a"
        queue.done("a")
        queue.add_after("b", 0.01)
        queue.forget("b")
        await asyncio.sleep(0.05)
        assert len(queue) == 0 and queue.delayed == 0
    run(scenario())


def test_failures_back_off_exponentially_per_key_until_one_succeeds():
    async def scenario():
        queue = WorkQueue()
        delays = [queue.retry("a") for _ in range(4)]
        assert delays == [0.5, 1.0, 2.0, 4.0]
        assert queue.retry("b") == 0.5
        queue.succeeded("a")
        assert queue.retry("a") == 0.5
        for _ in range(20):
            last = queue.retry("a")
        assert last == 60.0
        queue.forget("a")
        queue.forget("b")
    run(scenario())


def test_the_watch_check_reports_a_change_missed_for_a_whole_interval_only():
    from finetune_operator.health import Health, WatchCheck
    check, health = WatchCheck(), Health()
    a, b, c = ("ns", "a"), ("ns", "b"), ("ns", "c")
    # b changed in the API just before the listing: not delivered yet, not stalled yet.
    assert check.check({a: 10, b: 12}, {a: 10, b: 11}) == []
    # Delivered by the next check: fine. c appeared and is late for the first time.
    assert check.check({a: 10, b: 12, c: 20}, {a: 10, b: 12}) == []
    # c still missing with the same version a whole interval later: the watch is stalled.
    assert check.check({a: 10, b: 12, c: 20}, {a: 10, b: 12}) == [c]
    health.watch_checked([c])
    assert "ns/c" in health.problem
    # A change the watch keeps up with (a new version each time) is never called stalled, and a
    # deletion it missed is, once it has been missed twice.
    assert check.check({a: 10, b: 13}, {a: 10, b: 12, c: 20}) == []
    assert check.check({a: 10, b: 14}, {a: 10, b: 13, c: 20}) == [c]
    health.watch_checked([])
    assert health.problem is None
