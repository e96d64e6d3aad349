"""personvlad.data"""
