# The Teltonika ingestion server (and, with another CMD, the processor).
#   docker build -t teltonika .
#   docker run -p 5027:5027 teltonika twistd --nodaemon --pidfile= teltonika --port 5027
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY setup.py setup.cfg README.rst ./
COPY teltonika ./teltonika
COPY twisted ./twisted
RUN pip install '.[processor,tls]' \
    # Regenerate Twisted's plugin cache now: at run time the non-root user cannot write
    # site-packages, and Twisted would rescan every plugin on every start.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd --help | grep -q teltonika \
    && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /data --create-home teltonika
USER teltonika
WORKDIR /data

EXPOSE 5027 9105 9106 8090
# --pidfile= : a twistd.pid left by a crashed container would block the restart.
# --metrics on all interfaces inside the container; publish the port only to the
# monitoring network.
CMD ["twistd", "--nodaemon", "--pidfile=", "teltonika", "--port", "5027", \
     "--redis", "redis://redis:6379/0", "--metrics", "tcp:9105"]
