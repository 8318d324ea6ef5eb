"""Label Studio ML backend for insid3: brush-mask predictions from annotated examples.

Serve it with ``insid3 labelstudio serve``; :func:`labelstudio_backend.app.create_app` builds
the Flask app that speaks the ML-backend protocol Label Studio calls.
"""
