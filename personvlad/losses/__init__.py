"""personvlad.losses"""
