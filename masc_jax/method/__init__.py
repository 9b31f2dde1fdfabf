"""The MASC method as pure functions: losses, routing rules, metrics, stacked agents, train steps."""
