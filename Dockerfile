# ptst-proxy, the proxy alone: python:3.11-slim, no CUDA, no vLLM. Its routes point at a vLLM
# running elsewhere (docker-compose.yml runs one next to it). With vLLM inside: Dockerfile.gpu.
#   docker build -t ptst-proxy .
#   docker run -p 8080:8080 -v "$PWD/deploy:/config:ro" -v ptst-logs:/opt/ptst/ptst-logs ptst-proxy
# The config is $PTST_CONFIG (/config/ptst.yaml); another file: `... ptst-proxy serve --config
# /config/other.yaml --host 0.0.0.0 --port 8080`. The container always listens on 8080.

# The runtime dependency list, read from pyproject.toml. The final stage copies only this file,
# so its dependency layer is rebuilt when the list changes, not when the code or the rest of
# pyproject.toml does.
FROM python:3.11-slim AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; f = open('/src/pyproject.toml', 'rb'); print(*tomllib.load(f)['project']['dependencies'], sep='\n')" > /requirements.txt

# The wheel, from the whole build context (.dockerignore keeps it to the sources): ptst/ links
# to the top-level folders, which must be there too. The wheel holds real files (the templates
# as ptst/templates).
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The user the proxy runs as (uid 10001) and the one folder it writes: the refusal log.
RUN groupadd --system --gid 10001 ptst \
    && useradd --system --uid 10001 --gid ptst --home-dir /home/ptst --create-home \
        --shell /usr/sbin/nologin ptst \
    && mkdir -p /opt/ptst/ptst-logs /config \
    && chown ptst:ptst /opt/ptst/ptst-logs

# Dependencies first: this layer is reused until the dependency list changes.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt

# Then the code, without dependencies (installed above). /opt/ptst/templates is a stable path
# for the templates shipped in the wheel (deploy/ptst.yaml's templates_dir).
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist /tmp/requirements.txt \
    && ln -s "$(python -c 'from ptst.proxy.templates import builtin_templates_dir as d; print(d())')" /opt/ptst/templates \
    && ptst --version

WORKDIR /opt/ptst
ENV PTST_CONFIG=/config/ptst.yaml
USER 10001:10001
EXPOSE 8080
# "The process serves": GET /v1/models answers 200, or 401 when api_keys are set (the check has
# no key). Not /health, which is 503 while an upstream is down: a restart would not fix that.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import http.client, sys; c = http.client.HTTPConnection('127.0.0.1', 8080, timeout=4); c.request('GET', '/v1/models'); sys.exit(c.getresponse().status not in (200, 401))"]
ENTRYPOINT ["ptst"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
