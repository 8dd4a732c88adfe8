"""The inbox room: which files in the inbox are complete stories, and whether the shares are still there.

    watch.py       `InboxWatcher`: when to look, and each complete file offered once, in arrival order
    scan.py        one look at the inbox (on its own thread, with a deadline); which names count
    settle.py      when a file has stopped changing (pure: no threads, times passed in)
    supervisor.py  the watchdog observer, restarted when it dies; the watch mode
    fstype.py      the filesystem holding a folder (polling on network shares)
    folders.py     `FolderGuard`: are the inbox and outbox still the folders (mounts) they were at start?

It writes nothing and knows nothing of claims: the queue takes what it offers.
"""
