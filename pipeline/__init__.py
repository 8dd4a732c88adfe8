"""storyreel's library: story model -> prompts -> images -> clips -> package.

Knows nothing of watched folders; the daemon package drives it.
"""
