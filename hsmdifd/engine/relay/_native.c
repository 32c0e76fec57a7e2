/* The relays' hot path in C: mutual TLS 1.3 over a connected socket, and the copy
 * loop between two sockets (either one under TLS), one thread for both directions.
 *
 * Python keeps every decision (who may connect, the lease token, when a relay
 * closes); this module only does what costs per byte or per message: the handshake,
 * reading and writing TLS records, and copying. Each call runs without the GIL.
 * The sockets stay Python's: nothing here closes a descriptor. A Python thread
 * ends a running splice by shutting the sockets down (`socket.shutdown`), which
 * wakes the loop's poll.
 *
 * Objects: a context (capsule "hsmdif.relay.context", an SSL_CTX) and a session
 * (capsule "hsmdif.relay.session", an SSL bound to one descriptor).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#define CONTEXT_NAME "hsmdif.relay.context"
#define SESSION_NAME "hsmdif.relay.session"
#define BUFFER_BYTES (256 * 1024)
#define REASON_BYTES 256

/* ------------------------------------------------------------------ helpers */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Milliseconds left until `deadline` for poll(): -1 without one, 0 once past. */
static int remaining_ms(double deadline)
{
    if (deadline < 0)
        return -1;
    double left = deadline - now();
    if (left <= 0)
        return 0;
    return left > 86400.0 ? 86400000 : (int)(left * 1000.0) + 1;
}

static int set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -1;
    return 0;
}

/* The newest OpenSSL error of this thread (or `fallback`) into `out`; clears the queue. */
static void ssl_reason(char *out, size_t size, const char *fallback)
{
    unsigned long code = ERR_get_error();
    unsigned long next;
    while ((next = ERR_get_error()) != 0)
        code = next;
    if (code == 0) {
        snprintf(out, size, "%s", fallback);
        return;
    }
    const char *reason = ERR_reason_error_string(code);
    snprintf(out, size, "%s", reason ? reason : fallback);
}

static PyObject *raise_reason(PyObject *type, const char *what, const char *reason)
{
    PyErr_Format(type, "%s: %s", what, reason);
    return NULL;
}

/* ------------------------------------------------------------------ context */

static void free_context(PyObject *capsule)
{
    SSL_CTX *ctx = PyCapsule_GetPointer(capsule, CONTEXT_NAME);
    if (ctx)
        SSL_CTX_free(ctx);
}

static X509 *read_certificate(const char *pem, Py_ssize_t size)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)size);
    X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    return cert;
}

/* context(server, cert_pem, key_pem, ca_pem): TLS 1.3 only, the peer's certificate
 * required and verified against `ca_pem` alone. */
static PyObject *py_context(PyObject *self, PyObject *args)
{
    int server;
    const char *cert_pem, *key_pem, *ca_pem;
    Py_ssize_t cert_len, key_len, ca_len;
    if (!PyArg_ParseTuple(args, "py#y#y#", &server, &cert_pem, &cert_len, &key_pem, &key_len,
                          &ca_pem, &ca_len))
        return NULL;
    if (cert_len > INT_MAX || key_len > INT_MAX || ca_len > INT_MAX)
        return PyErr_Format(PyExc_ValueError, "credentials too large");

    char reason[REASON_BYTES] = "";
    const char *step = "cannot make a TLS context";
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    X509 *cert = NULL, *ca = NULL;
    EVP_PKEY *key = NULL;
    BIO *bio = NULL;
    if (!ctx)
        goto fail;
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
        !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION))
        goto fail;
    step = "the CA certificate cannot be read";
    if (!(ca = read_certificate(ca_pem, ca_len)) ||
        !X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx), ca))
        goto fail;
    step = "this device's certificate cannot be read";
    if (!(cert = read_certificate(cert_pem, cert_len)) || !SSL_CTX_use_certificate(ctx, cert))
        goto fail;
    step = "this device's key cannot be read";
    if (!(bio = BIO_new_mem_buf(key_pem, (int)key_len)) ||
        !(key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)) ||
        !SSL_CTX_use_PrivateKey(ctx, key) || !SSL_CTX_check_private_key(ctx))
        goto fail;
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    /* A peer's FIN without close_notify ends its direction like a close_notify: a
     * relay's peer that died ends the same way, and llama.cpp's messages carry
     * their lengths, so a cut one is seen. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (server)
        SSL_CTX_set_num_tickets(ctx, 0); /* nothing is resumed */
    X509_free(cert);
    X509_free(ca);
    EVP_PKEY_free(key);
    BIO_free(bio);
    PyObject *capsule = PyCapsule_New(ctx, CONTEXT_NAME, free_context);
    if (!capsule)
        SSL_CTX_free(ctx);
    return capsule;

fail:
    ssl_reason(reason, sizeof reason, "unknown error");
    X509_free(cert);
    X509_free(ca);
    EVP_PKEY_free(key);
    BIO_free(bio);
    SSL_CTX_free(ctx);
    return raise_reason(PyExc_ValueError, step, reason);
}

/* ------------------------------------------------------------------ session */

static void free_session(PyObject *capsule)
{
    SSL *ssl = PyCapsule_GetPointer(capsule, SESSION_NAME);
    if (ssl)
        SSL_free(ssl);
}

static SSL *session_of(PyObject *capsule)
{
    return PyCapsule_GetPointer(capsule, SESSION_NAME);
}

/* Wait until `fd` is ready for what the last TLS call on it wants. 1: ready,
 * 0: timed out, -1: errno. */
static int wait_for(int fd, int want_write, double deadline)
{
    struct pollfd p = {.fd = fd, .events = want_write ? POLLOUT : POLLIN};
    for (;;) {
        int n = poll(&p, 1, remaining_ms(deadline));
        if (n >= 0)
            return n > 0;
        if (errno != EINTR)
            return -1;
    }
}

enum step_result { STEP_DONE, STEP_TIMEOUT, STEP_CLOSED, STEP_FAILED };

/* Drive one TLS call to its end before `deadline`: `call` returns the OpenSSL result
 * of SSL_do_handshake/SSL_read/SSL_write. On success `*result` is its value. */
static enum step_result drive(SSL *ssl, int fd, double deadline, int (*call)(SSL *, void *, int),
                              void *buf, int len, int *result, char *reason, size_t size)
{
    for (;;) {
        ERR_clear_error();
        int r = call(ssl, buf, len);
        if (r > 0) {
            *result = r;
            return STEP_DONE;
        }
        int err = SSL_get_error(ssl, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
            int ready = wait_for(fd, err == SSL_ERROR_WANT_WRITE, deadline);
            if (ready == 0)
                return STEP_TIMEOUT;
            if (ready < 0) {
                snprintf(reason, size, "%s", strerror(errno));
                return STEP_FAILED;
            }
            continue;
        }
        if (err == SSL_ERROR_ZERO_RETURN) {
            snprintf(reason, size, "closed by the peer");
            return STEP_CLOSED;
        }
        if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
            snprintf(reason, size, "%s", r == 0 || errno == 0 ? "closed by the peer" : strerror(errno));
            return r == 0 || errno == 0 ? STEP_CLOSED : STEP_FAILED;
        }
        long verify = SSL_get_verify_result(ssl);
        if (verify != X509_V_OK)
            snprintf(reason, size, "the peer's certificate is refused: %s",
                     X509_verify_cert_error_string(verify));
        else
            ssl_reason(reason, size, "TLS failed");
        return STEP_FAILED;
    }
}

static int call_handshake(SSL *ssl, void *buf, int len)
{
    (void)buf;
    (void)len;
    return SSL_do_handshake(ssl);
}

static int call_read(SSL *ssl, void *buf, int len) { return SSL_read(ssl, buf, len); }

static int call_write(SSL *ssl, void *buf, int len) { return SSL_write(ssl, buf, len); }

static double deadline_after(double timeout) { return timeout < 0 ? -1.0 : now() + timeout; }

static PyObject *raise_step(enum step_result r, const char *what, const char *reason)
{
    if (r == STEP_TIMEOUT)
        return raise_reason(PyExc_TimeoutError, what, "timed out");
    return raise_reason(PyExc_ConnectionError, what, reason);
}

/* handshake(context, fd, server_name, timeout): a session over `fd` (made
 * non-blocking) once the peer proved a certificate of the CA. A client checks the
 * server's certificate names `server_name`. */
static PyObject *py_handshake(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    int fd;
    const char *server_name;
    double timeout;
    if (!PyArg_ParseTuple(args, "Oizd", &capsule, &fd, &server_name, &timeout))
        return NULL;
    SSL_CTX *ctx = PyCapsule_GetPointer(capsule, CONTEXT_NAME);
    if (!ctx)
        return NULL;
    if (set_nonblocking(fd) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);

    char reason[REASON_BYTES] = "";
    SSL *ssl = SSL_new(ctx);
    if (!ssl || !SSL_set_fd(ssl, fd)) {
        ssl_reason(reason, sizeof reason, "out of memory");
        SSL_free(ssl);
        return raise_reason(PyExc_OSError, "cannot start TLS", reason);
    }
    if (server_name) {
        if (!SSL_set_tlsext_host_name(ssl, server_name) || !SSL_set1_host(ssl, server_name)) {
            SSL_free(ssl);
            return raise_reason(PyExc_ValueError, "cannot start TLS", "bad server name");
        }
        SSL_set_connect_state(ssl);
    } else {
        SSL_set_accept_state(ssl);
    }
    int result = 0;
    enum step_result r;
    Py_BEGIN_ALLOW_THREADS
    r = drive(ssl, fd, deadline_after(timeout), call_handshake, NULL, 0, &result, reason,
              sizeof reason);
    Py_END_ALLOW_THREADS
    if (r != STEP_DONE) {
        SSL_free(ssl);
        return raise_step(r, "TLS handshake", reason);
    }
    PyObject *session = PyCapsule_New(ssl, SESSION_NAME, free_session);
    if (!session)
        SSL_free(ssl);
    return session;
}

/* peer_certificate(session): the DER of the certificate the handshake verified. */
static PyObject *py_peer_certificate(PyObject *self, PyObject *capsule)
{
    SSL *ssl = session_of(capsule);
    if (!ssl)
        return NULL;
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (!cert)
        return PyBytes_FromStringAndSize(NULL, 0);
    unsigned char *der = NULL;
    int len = i2d_X509(cert, &der);
    X509_free(cert);
    if (len < 0)
        return PyErr_Format(PyExc_ValueError, "the peer's certificate cannot be encoded");
    PyObject *out = PyBytes_FromStringAndSize((const char *)der, len);
    OPENSSL_free(der);
    return out;
}

/* Move all `len` bytes of `buf` with `call` (call_read or call_write) before
 * `deadline`; call without the GIL. */
static enum step_result transfer(SSL *ssl, char *buf, Py_ssize_t len, double deadline,
                                 int (*call)(SSL *, void *, int), char *reason)
{
    int fd = SSL_get_fd(ssl);
    enum step_result r = STEP_DONE;
    Py_ssize_t done = 0;
    while (done < len && r == STEP_DONE) {
        int n = 0;
        r = drive(ssl, fd, deadline, call, buf + done, (int)(len - done), &n, reason,
                  REASON_BYTES);
        done += n;
    }
    return r;
}

/* send_all(session, data, timeout) */
static PyObject *py_send_all(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    Py_buffer data;
    double timeout;
    if (!PyArg_ParseTuple(args, "Oy*d", &capsule, &data, &timeout))
        return NULL;
    SSL *ssl = session_of(capsule);
    if (!ssl || data.len > INT_MAX) {
        PyBuffer_Release(&data);
        return ssl ? PyErr_Format(PyExc_ValueError, "too much data") : NULL;
    }
    char reason[REASON_BYTES] = "";
    double deadline = deadline_after(timeout);
    enum step_result r;
    Py_BEGIN_ALLOW_THREADS
    r = transfer(ssl, data.buf, data.len, deadline, call_write, reason);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (r != STEP_DONE)
        return raise_step(r, "sending", reason);
    Py_RETURN_NONE;
}

/* recv_exact(session, size, timeout): `size` bytes, or an error. */
static PyObject *py_recv_exact(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    Py_ssize_t size;
    double timeout;
    if (!PyArg_ParseTuple(args, "Ond", &capsule, &size, &timeout))
        return NULL;
    SSL *ssl = session_of(capsule);
    if (!ssl)
        return NULL;
    if (size < 0 || size > 65536)
        return PyErr_Format(PyExc_ValueError, "recv_exact reads 0 to 65536 bytes");
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out)
        return NULL;
    char *buf = PyBytes_AS_STRING(out);
    char reason[REASON_BYTES] = "";
    double deadline = deadline_after(timeout);
    enum step_result r;
    Py_BEGIN_ALLOW_THREADS
    r = transfer(ssl, buf, size, deadline, call_read, reason);
    Py_END_ALLOW_THREADS
    if (r != STEP_DONE) {
        Py_DECREF(out);
        return raise_step(r, "receiving", reason);
    }
    return out;
}

/* ------------------------------------------------------------------ splice */

/* One end of a splice: a descriptor, under TLS when `ssl` is set. */
struct end {
    int fd;
    SSL *ssl;
    int write_shut; /* this end was told no more comes */
};

/* One direction: bytes read from `src`, not yet all written to `dst`. */
struct flow {
    struct end *src, *dst;
    char *buf;
    int len, off;
    int eof;     /* `src` has ended */
    int done;    /* ended, and the end passed on to `dst` */
    int drained; /* the last read took all `src` had: wait for POLLIN before the next */
    int ready;   /* poll said `want_fd` is ready, or nothing has blocked yet */
    short want;  /* what the blocked call waits for: POLLIN or POLLOUT ... */
    int want_fd;
    uint64_t *reads, *bytes;
};

enum io { IO_OK, IO_BLOCKED, IO_EOF, IO_FAILED };

/* What a recv() or send() result `r` means for the loop; `blocked_on` is what the
 * call waits for when it would block. */
static enum io plain_io(ssize_t r, short blocked_on, int *n, short *want, char *reason)
{
    if (r > 0 || (r == 0 && blocked_on == POLLOUT)) {
        *n = (int)r;
        return IO_OK;
    }
    if (r == 0)
        return IO_EOF;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
        *want = blocked_on;
        return IO_BLOCKED;
    }
    snprintf(reason, REASON_BYTES, "%s", strerror(errno));
    return IO_FAILED;
}

/* What an SSL_read() (`reading`) or SSL_write() result `r` means for the loop. */
static enum io tls_io(SSL *ssl, int r, int reading, int *n, short *want, char *reason)
{
    if (r > 0) {
        *n = r;
        return IO_OK;
    }
    int err = SSL_get_error(ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
        *want = err == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN;
        return IO_BLOCKED;
    }
    if (reading && err == SSL_ERROR_ZERO_RETURN)
        return IO_EOF;
    if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
        if (reading && (r == 0 || errno == ECONNRESET || errno == 0))
            return IO_EOF;
        snprintf(reason, REASON_BYTES, "%s", errno ? strerror(errno) : "closed");
        return IO_FAILED;
    }
    ssl_reason(reason, REASON_BYTES, reading ? "TLS read failed" : "TLS write failed");
    return IO_FAILED;
}

static enum io end_read(struct end *e, char *buf, int size, int *n, short *want, char *reason)
{
    if (!e->ssl)
        return plain_io(recv(e->fd, buf, (size_t)size, 0), POLLIN, n, want, reason);
    ERR_clear_error();
    return tls_io(e->ssl, SSL_read(e->ssl, buf, size), 1, n, want, reason);
}

static enum io end_write(struct end *e, const char *buf, int size, int *n, short *want,
                         char *reason)
{
    if (!e->ssl)
        return plain_io(send(e->fd, buf, (size_t)size, MSG_NOSIGNAL), POLLOUT, n, want, reason);
    ERR_clear_error();
    return tls_io(e->ssl, SSL_write(e->ssl, buf, size), 0, n, want, reason);
}

/* Tell `e` that nothing more comes: a close_notify under TLS (TLS 1.3 lets the other
 * direction go on), then the TCP write half. */
static void end_shut_write(struct end *e)
{
    if (e->write_shut)
        return;
    e->write_shut = 1;
    if (e->ssl) {
        ERR_clear_error();
        SSL_shutdown(e->ssl); /* one try: a full send buffer only loses the notify */
        ERR_clear_error();
    }
    shutdown(e->fd, SHUT_WR);
}

/* Move what can move in one direction without blocking. IO_FAILED ends the splice. */
static enum io flow_step(struct flow *f, char *reason)
{
    for (;;) {
        if (f->done)
            return IO_OK;
        if (f->len > f->off) {
            int n = 0;
            short want = 0;
            enum io r = end_write(f->dst, f->buf + f->off, f->len - f->off, &n, &want, reason);
            if (r == IO_BLOCKED) {
                f->want = want;
                f->want_fd = f->dst->fd;
                return IO_BLOCKED;
            }
            if (r != IO_OK)
                return IO_FAILED;
            f->off += n;
            if (f->off == f->len)
                f->off = f->len = 0;
            continue;
        }
        if (f->eof) {
            end_shut_write(f->dst);
            f->done = 1;
            return IO_EOF;
        }
        if (f->drained) {
            /* Another read now would most likely find nothing: poll first. */
            f->drained = 0;
            f->want = POLLIN;
            f->want_fd = f->src->fd;
            return IO_BLOCKED;
        }
        int n = 0;
        short want = 0;
        enum io r = end_read(f->src, f->buf, BUFFER_BYTES, &n, &want, reason);
        if (r == IO_BLOCKED) {
            f->want = want;
            f->want_fd = f->src->fd;
            return IO_BLOCKED;
        }
        if (r == IO_EOF) {
            f->eof = 1;
            continue;
        }
        if (r == IO_FAILED)
            return IO_FAILED;
        f->len = n;
        f->off = 0;
        /* A short read emptied the socket; under TLS only if OpenSSL holds nothing
         * back (it reads one record at a time: read_ahead is off). */
        f->drained = n < BUFFER_BYTES && !(f->src->ssl && SSL_has_pending(f->src->ssl));
        *f->reads += 1;
        *f->bytes += (uint64_t)n;
    }
}

static void add_want(struct pollfd *fds, int *count, int fd, short events)
{
    for (int i = 0; i < *count; i++) {
        if (fds[i].fd == fd) {
            fds[i].events |= events;
            return;
        }
    }
    fds[*count].fd = fd;
    fds[*count].events = events;
    fds[*count].revents = 0;
    (*count)++;
}

/* splice(a_fd, a_session, b_fd, b_session, linger, counters): copy a->b and b->a
 * until both directions ended (each end passed on), a socket failed, or `linger`
 * seconds after the first direction ended. `counters` is a writable buffer of four
 * native uint64: reads and bytes a->b, then b->a, added to. Returns None, or the
 * reason the splice stopped early as a str. */
static PyObject *py_splice(PyObject *self, PyObject *args)
{
    int a_fd, b_fd;
    PyObject *a_capsule, *b_capsule;
    double linger;
    Py_buffer counters;
    if (!PyArg_ParseTuple(args, "iOiOdw*", &a_fd, &a_capsule, &b_fd, &b_capsule, &linger,
                          &counters))
        return NULL;
    PyObject *result = NULL;
    char *bufs = NULL;
    struct end a = {.fd = a_fd}, b = {.fd = b_fd};
    if (counters.len < (Py_ssize_t)(4 * sizeof(uint64_t)) ||
        ((uintptr_t)counters.buf % sizeof(uint64_t)) != 0) {
        PyErr_Format(PyExc_ValueError, "counters must be 32 aligned bytes");
        goto out;
    }
    if (a_capsule != Py_None && !(a.ssl = session_of(a_capsule)))
        goto out;
    if (b_capsule != Py_None && !(b.ssl = session_of(b_capsule)))
        goto out;
    if ((a.ssl && SSL_get_fd(a.ssl) != a_fd) || (b.ssl && SSL_get_fd(b.ssl) != b_fd)) {
        PyErr_Format(PyExc_ValueError, "a session belongs to another descriptor");
        goto out;
    }
    if (set_nonblocking(a_fd) < 0 || set_nonblocking(b_fd) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    if (!(bufs = PyMem_RawMalloc(2 * BUFFER_BYTES))) {
        PyErr_NoMemory();
        goto out;
    }
    uint64_t *cells = counters.buf;
    struct flow flows[2] = {
        {.src = &a, .dst = &b, .buf = bufs, .ready = 1, .reads = &cells[0], .bytes = &cells[1]},
        {.src = &b,
         .dst = &a,
         .buf = bufs + BUFFER_BYTES,
         .ready = 1,
         .reads = &cells[2],
         .bytes = &cells[3]},
    };
    char reason[REASON_BYTES] = "";
    int failed = 0;
    double linger_until = -1.0;

    /* Each round steps only the directions poll woke (a message one way costs a poll,
     * a read and a write: no read that finds nothing), then polls for what the
     * blocked ones wait for. */
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        struct pollfd fds[2];
        int count = 0;
        for (int i = 0; i < 2 && !failed; i++) {
            struct flow *f = &flows[i];
            if (f->ready && !f->done) {
                f->ready = 0;
                if (flow_step(f, reason) == IO_FAILED)
                    failed = 1;
            }
            if (!f->done)
                add_want(fds, &count, f->want_fd, f->want);
        }
        if (failed || (flows[0].done && flows[1].done))
            break;
        if (linger_until < 0 && (flows[0].done || flows[1].done))
            linger_until = now() + linger;
        int n = poll(fds, (nfds_t)count, remaining_ms(linger_until));
        if (n < 0 && errno != EINTR) {
            snprintf(reason, sizeof reason, "poll: %s", strerror(errno));
            failed = 1;
            break;
        }
        if (n == 0 && linger_until >= 0 && remaining_ms(linger_until) == 0) {
            snprintf(reason, sizeof reason, "the other direction did not end in time");
            failed = 1;
            break;
        }
        for (int i = 0; i < 2 && n > 0; i++)
            for (int j = 0; j < count; j++)
                if (fds[j].fd == flows[i].want_fd &&
                    (fds[j].revents & (flows[i].want | POLLERR | POLLHUP | POLLNVAL)))
                    flows[i].ready = 1;
    }
    Py_END_ALLOW_THREADS

    if (failed)
        result = PyUnicode_FromString(reason[0] ? reason : "failed");
    else
        result = Py_NewRef(Py_None);
out:
    PyMem_RawFree(bufs);
    PyBuffer_Release(&counters);
    return result;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"context", py_context, METH_VARARGS,
     "context(server, cert_pem, key_pem, ca_pem) -> a TLS 1.3 context, peer certificate "
     "required"},
    {"handshake", py_handshake, METH_VARARGS,
     "handshake(context, fd, server_name, timeout) -> a session; server_name None on the "
     "server side"},
    {"peer_certificate", py_peer_certificate, METH_O,
     "peer_certificate(session) -> the verified peer certificate, DER"},
    {"send_all", py_send_all, METH_VARARGS, "send_all(session, data, timeout)"},
    {"recv_exact", py_recv_exact, METH_VARARGS, "recv_exact(session, size, timeout) -> bytes"},
    {"splice", py_splice, METH_VARARGS,
     "splice(a_fd, a_session, b_fd, b_session, linger, counters) -> None or why it stopped"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "The relays' TLS and copy loop.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
