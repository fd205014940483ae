FROM python:3.11-slim

WORKDIR /app
# gunicorn's workers add up their request metrics in PROMETHEUS_MULTIPROC_DIR;
# gunicorn.conf.py empties it at each start.
ENV PYTHONUNBUFFERED=1 FLASK_APP=wsgi PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY service service
COPY workers workers
COPY migrations migrations
COPY wsgi.py gunicorn.conf.py ./

RUN useradd --system app
USER app
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--worker-class", "gthread", \
     "--threads", "4", "wsgi:app"]
