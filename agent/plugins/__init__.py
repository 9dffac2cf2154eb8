"""Plugins: the API plugin authors use (``api``) and the example plugins shipped with every
agent (``file``, ``log``, ``java``, ``tomcat``). They run in the agent's worker process."""

#: bundled plugin module -> the cmd words it serves (checked against the modules by a test, so
#: the agent can route a cmd word without importing plugin code into its own process)
BUNDLED: dict[str, tuple[str, ...]] = {
    "file": ("file.read", "file.write"),
    "log": ("log.tail",),
    "java": ("java.gc",),
    "tomcat": ("tomcat.status",),
}
