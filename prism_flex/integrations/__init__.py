"""Optional integrations with other libraries.

Each submodule imports its library lazily (on import of the submodule itself); importing
``prism_flex`` or ``prism_flex.integrations`` imports none of them.
"""
