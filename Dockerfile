FROM python:3.11-slim

WORKDIR /app
ENV PYTHONUNBUFFERED=1 FLASK_APP=wsgi
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
