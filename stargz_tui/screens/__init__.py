"""The app's screens (home, image, layer, mounts, repos, modals, help) and their base.
They reach ``core`` only through ``stargz_tui.services`` and the view modules.
"""
