#include "tap-transmission.h"

// Linux only (eventfd, pthread_setname_np); elsewhere the classes are not
// registered and the tap keeps its TypeScript data path.
#if defined(__linux__)

#include <atomic>
#include <chrono>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "addon-arguments.h"
#include "hrl-appender.h"

namespace blockrelay {

namespace {

// NBD protocol constants (src/tap/nbd-protocol.ts holds the same).
constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr size_t kRequestHeaderBytes = 28;
constexpr size_t kReplyHeaderBytes = 16;
constexpr uint16_t kCmdRead = 0;
constexpr uint16_t kCmdWrite = 1;
constexpr uint16_t kCmdDisc = 2;
constexpr uint16_t kCmdFlush = 3;
constexpr uint16_t kFlagFua = 1;
constexpr uint32_t kNbdEperm = 1;
constexpr uint32_t kNbdEio = 5;
constexpr uint32_t kNbdEinval = 22;
constexpr uint32_t kNbdEnospc = 28;

// Write-intent regions: src/tracking/change-tracker.ts WRITE_INTENT_REGION_BYTES.
constexpr unsigned kIntentRegionShift = 24;

// Events a connection thread posts to JavaScript.
enum EventKind : int {
  kEventIntent = 1,       // thread waits for resume(): mark the write intent of [offset, +length)
  kEventFlush = 2,        // make disk and log durable, then reply(handle)
  kEventSlow = 3,         // a request JavaScript carries out; thread waits for resume()
  kEventWriteFailed = 4,  // the disk write of a recorded write failed (already answered)
  kEventExit = 5,         // the thread ended; error holds the reason
};

enum ExitReason : int {
  kExitPeerClosed = 0,
  kExitBadMagic = 1,
  kExitSocketError = 2,
  kExitStopped = 3,
  kExitDisconnect = 4,
};

// Tracking modes set by the change tracker.
// kModeRefuse: the tracker is closed; writes fail without touching the disk.
enum Mode : int { kModeUntracked = 0, kModeDirtyOnly = 1, kModeLogging = 2, kModeRefuse = 3 };

inline uint16_t Be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
inline uint32_t Be32(const uint8_t* p) {
  return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) | (static_cast<uint32_t>(p[2]) << 8) | p[3];
}
inline uint64_t Be64(const uint8_t* p) { return (static_cast<uint64_t>(Be32(p)) << 32) | Be32(p + 4); }
inline void PutBe32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}


class ConnCore;

// A WRITE waiting for the writer thread; owns its payload buffer. With
// logging, its connection thread appends it to `log` (in queue order, see
// DoWrite) before the writer may write the disk.
struct WriteJob {
  std::shared_ptr<ConnCore> conn;
  std::unique_ptr<AlignedBuffer> payload;
  std::shared_ptr<HrlAppenderCore> log;
  uint64_t offset = 0;
  size_t length = 0;
  uint8_t handle[8] = {};
  bool fua = false;
  // Under ExportCore::mu: false while the log append is under way.
  bool logged = true;
  int logError = 0;
  uint64_t logSize = 0;
};

// State every connection to one export shares: the disk, the tracking mode
// and log, write-intent regions known durable, the records not yet taken by
// JavaScript, and the write queue. A WRITE is recorded and queued under the
// mutex; one writer thread per export carries the queue out in order (log
// append, then disk write), so log order equals disk order across
// connections, while the connection threads go on receiving.
struct ExportCore {
  // The export's own duplicate of the disk's descriptor, closed with the
  // last reference: a connection thread still in a pread after JavaScript
  // closed the target (a grace timeout ran out) reads the disk, never a
  // closed descriptor or one reused for another file.
  int diskFd = -1;
  ~ExportCore() {
    if (diskFd >= 0) close(diskFd);
  }
  uint64_t sizeBytes = 0;
  uint32_t minBlockBytes = 1;
  uint32_t maxBlockBytes = 0;
  bool tracked = false;

  std::mutex mu;
  std::condition_variable cv;
  // While positive no write starts (the tracker holds the lock, or a
  // JavaScript mutation runs); created held until the tracker releases it.
  uint32_t holdCount = 1;
  int mode = kModeUntracked;
  std::shared_ptr<HrlAppenderCore> log;
  uint64_t logLimitBytes = UINT64_MAX;
  // Set when the log passed its limit or failed; logging writes wait until
  // the tracker has dealt with it (a release clears it).
  int attention = 0;  // 1 overflow, 2 log I/O error
  int attentionErrno = 0;
  std::vector<uint8_t> durable;
  std::vector<double> records;  // offset, length pairs
  size_t maxRecordPairs = 1u << 16;
  bool notifyPending = false;
  bool closed = false;
  Napi::ThreadSafeFunction notify;
  std::atomic<uint64_t> bytesWritten{0};

  // Holds asked for while writes were still queued or being written: the
  // writer thread signals `held` once the queue is empty (no new write can
  // join it while holdCount is positive), and the main thread resolves them.
  // Waiting on the main thread instead froze the event loop for as long as
  // the disk took (forever on a hung disk).
  uint32_t pendingHolds = 0;
  bool heldSignalPending = false;
  Napi::ThreadSafeFunction held;
  std::weak_ptr<ExportCore> self;
  // The promises of those holds; touched on the main thread only.
  std::vector<Napi::Promise::Deferred> holdDeferreds;
  // close(): its promises (main thread only) resolve once the writer thread
  // has ended, which it signals through `held`. Under mu: the thread has
  // left WriterLoop; the wrap was finalized (nothing may be posted then).
  std::vector<Napi::Promise::Deferred> closeDeferreds;
  bool writerExited = false;
  bool finalized = false;
  bool closeSettled = false;
  // Main thread, once the writer has ended: joins it, settles pending holds
  // and closes, and releases the thread-safe functions.
  void FinishClose(Napi::Env env);
  // The environment's teardown (a worker thread ending, the process
  // exiting) frees the thread-safe functions, even with a close pending
  // whose writer is still in a write to a hung disk: that writer must not
  // post when the disk answers. This hook marks the core finalized first
  // (Node runs cleanup hooks newest first, so before the functions' own).
  // Its argument is owned by whoever runs first: the hook, or
  // RemoveTeardownHook once nothing more can be posted. Main thread only.
  std::weak_ptr<ExportCore>* teardownHookArg = nullptr;
  static void TeardownHook(void* arg);
  void RemoveTeardownHook(napi_env env);

  std::deque<std::shared_ptr<WriteJob>> jobs;
  size_t jobBytes = 0;
  // Log appends happen in queue order: a job queued with seq n is appended
  // once appendTurn reaches n.
  uint64_t nextAppendSeq = 0;
  uint64_t appendTurn = 0;
  std::condition_variable appendCv;
  bool writing = false;
  // Bytes queued for the writer beyond which a connection waits (one job is always allowed).
  size_t maxJobBytes = 64u << 20;
  std::condition_variable writerCv;
  std::thread writer;

  void WriterLoop();
  // With mu held: nothing queued or being carried out.
  bool Idle() const { return jobs.empty() && !writing; }

  // With mu held.
  void Notify() {
    if (notifyPending || closed) return;
    notifyPending = true;
    notify.NonBlockingCall();
  }

  // Records go to JavaScript in batches: waking the main thread for every
  // write took a fifth of the logged tap's CPU at 64 KiB. Every hold takes
  // them anyway (the tracker's lock, a cut, a flush, its 1 s persist), so
  // batching only delays what status() shows, by at most kRecordsAgeMs.
  static constexpr size_t kNotifyRecordDoubles = 2 * 1024;
  static constexpr std::chrono::milliseconds kRecordsAgeMs{5};
  std::chrono::steady_clock::time_point recordsSince;

  // With mu held, after appending records.
  void NotifyRecords() {
    if (records.empty() || notifyPending) return;
    if (records.size() >= kNotifyRecordDoubles || std::chrono::steady_clock::now() - recordsSince >= kRecordsAgeMs) Notify();
  }

  // With mu held: tells the main thread that pending holds can resolve.
  void SignalHeld() {
    if (pendingHolds == 0 || heldSignalPending || closed || !Idle()) return;
    heldSignalPending = true;
    std::weak_ptr<ExportCore> w = self;
    held.NonBlockingCall([w](Napi::Env env, Napi::Function) {
      if (std::shared_ptr<ExportCore> c = w.lock()) c->ResolveHolds(env);
    });
  }

  // Main thread: resolves every pending hold once the queue is empty.
  void ResolveHolds(Napi::Env env);
};

struct Event {
  int kind;
  uint32_t type;
  uint32_t flags;
  uint32_t handleHi;
  uint32_t handleLo;
  double offset;
  double length;
  int error;
};

class ConnCore : public std::enable_shared_from_this<ConnCore> {
 public:
  ConnCore(int sock, int wakeFd, std::shared_ptr<ExportCore> exp, std::vector<uint8_t> prefix)
      : sock_(sock), wakeFd_(wakeFd), exp_(std::move(exp)), in_(kInputBytes) {
    std::memcpy(in_.data(), prefix.data(), prefix.size() < kInputBytes ? prefix.size() : kInputBytes);
    inLen_ = prefix.size() < kInputBytes ? prefix.size() : kInputBytes;
  }
  ~ConnCore() {
    if (wakeFd_ >= 0) close(wakeFd_);
  }

  Napi::ThreadSafeFunction events;
  std::thread thread;
  // As ExportCore's: the environment's teardown frees `events`, and a thread
  // still in a READ from a hung disk must then neither post nor release it
  // when the disk answers. Main thread only; owned as there.
  std::weak_ptr<ConnCore>* teardownHookArg = nullptr;
  static void TeardownHook(void* arg) {
    auto* weak = static_cast<std::weak_ptr<ConnCore>*>(arg);
    if (std::shared_ptr<ConnCore> c = weak->lock()) {
      c->teardownHookArg = nullptr;
      std::lock_guard<std::mutex> lock(c->postMu_);
      c->postsClosed_ = true;
      c->envGone_ = true;
    }
    delete weak;
  }
  void RemoveTeardownHook(napi_env env) {
    std::weak_ptr<ConnCore>* arg = teardownHookArg;
    teardownHookArg = nullptr;
    if (arg == nullptr) return;
    napi_remove_env_cleanup_hook(env, TeardownHook, arg);
    delete arg;
  }
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> errorReplies{0};
  std::atomic<uint64_t> bytesWritten{0};
  std::atomic<uint64_t> bytesRead{0};

  void Run() {
    int reason = Loop();
    // A graceful stop or the client's DISC: every request already carried
    // out is answered before the thread lets go of the socket.
    const bool deliver = reason == kExitStopped || reason == kExitDisconnect;
    // Writes still queued for the disk finish first (bounded once stopping).
    WaitJobsDone(deliver);
    {
      // The last replies queued go out, and exited_ is set, in one step
      // under both locks: a reply queued before it is sent here, one after
      // it is refused (JavaScript then writes it to the socket itself), and
      // the writer's direct sends (under sendMu_) see exited_ and stop.
      std::lock_guard<std::mutex> send(sendMu_);
      std::unique_lock<std::mutex> lock(mu_);
      while (deliver && !outbox_.empty() && !aborting_.load()) {
        lock.unlock();
        const bool ok = SendOutboxLocked();
        lock.lock();
        if (!ok) break;
      }
      exited_.store(true);
      outbox_.clear();
      hasOutbox_.store(false);
    }
    Post({kEventExit, 0, 0, 0, 0, 0, 0, reason});
    std::lock_guard<std::mutex> lock(postMu_);
    postsClosed_ = true;
    if (!envGone_) events.Release();
  }

  // JavaScript's reply; false once the thread has ended (the caller then owns the socket again).
  bool Reply(const uint8_t* data, size_t length) {
    std::lock_guard<std::mutex> lock(mu_);
    if (exited_.load()) return false;
    outbox_.emplace_back(data, data + length);
    hasOutbox_.store(true);
    if (pendingJs_ > 0) pendingJs_--;
    cv_.notify_all();
    Wake();
    return true;
  }

  // The writer thread finished a queued write: answers it (or hands a FUA
  // write to JavaScript for the flush) and returns its buffer.
  void Completed(WriteJob& job, int err) {
    const bool fua = job.fua;
    uint8_t handle[8];
    std::memcpy(handle, job.handle, 8);
    const double offset = static_cast<double>(job.offset);
    const double length = static_cast<double>(job.length);
    ReleasePayload(std::move(job.payload));
    if (err != 0) {
      if (tracked_) Post({kEventWriteFailed, kCmdWrite, 0, 0, 0, offset, length, err});
      QueueReply(err == ENOSPC ? kNbdEnospc : kNbdEio, handle);
    } else {
      bytesWritten += job.length;
      exp_->bytesWritten += job.length;
      if (fua) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          pendingJs_++;
        }
        Post({kEventFlush, kCmdWrite, kFlagFua, Be32(handle), Be32(handle + 4), offset, length, 0});
      } else {
        QueueReply(0, handle);
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    connJobs_--;
    cv_.notify_all();
  }

  void Resume(int error) {
    std::lock_guard<std::mutex> lock(mu_);
    resumed_ = true;
    resumeError_ = error;
    cv_.notify_all();
  }

  // Stops reading requests. Graceful: what was carried out is still
  // answered, within kStopDrainMs; otherwise the thread lets go at once.
  void Stop(bool graceful) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stopping_.load()) drainDeadline_ = std::chrono::steady_clock::now() + std::chrono::milliseconds(kStopDrainMs);
      if (!graceful) aborting_.store(true);
      stopping_.store(true);
      cv_.notify_all();
      Wake();
    }
    std::lock_guard<std::mutex> lock(exp_->mu);
    exp_->cv.notify_all();
  }

 private:
  static constexpr size_t kInputBytes = 128 * 1024;
  // Payload buffers one connection may have queued for the disk.
  static constexpr size_t kMaxPayloadBytes = 64u << 20;
  static constexpr int kMaxPayloads = 32;
  // How long a graceful stop may take to answer what was carried out.
  static constexpr int kStopDrainMs = 10000;
  // Buffers larger than this are not kept for reuse.
  static constexpr size_t kKeepPayloadBytes = 1u << 20;
  static constexpr int kMaxPendingJs = 64;
  // Payload bytes beyond this are received straight into the payload buffer.
  static constexpr size_t kDirectReadBytes = 16 * 1024;

  void Wake() {
    uint64_t one = 1;
    ssize_t ignored = write(wakeFd_, &one, sizeof one);
    (void)ignored;
  }

  // Posts an event to JavaScript; nothing once the thread has posted its
  // exit and released the function (a write of a stop that stopped waiting
  // for it may still complete later, on the writer thread).
  void Post(const Event& e) {
    std::lock_guard<std::mutex> lock(postMu_);
    if (postsClosed_) return;
    Event* copy = new Event(e);
    if (events.NonBlockingCall(copy, [](Napi::Env env, Napi::Function fn, Event* ev) {
          if (env != nullptr && fn != nullptr) {
            fn.Call({Napi::Number::New(env, ev->kind), Napi::Number::New(env, ev->type), Napi::Number::New(env, ev->flags),
                     Napi::Number::New(env, ev->handleHi), Napi::Number::New(env, ev->handleLo), Napi::Number::New(env, ev->offset),
                     Napi::Number::New(env, ev->length), Napi::Number::New(env, ev->error)});
          }
          delete ev;
        }) != napi_ok) {
      delete copy;
    }
  }

  // Sends JavaScript's queued replies. False when the socket failed or we stop.
  bool SendOutbox() {
    std::lock_guard<std::mutex> send(sendMu_);
    return SendOutboxLocked();
  }

  // With sendMu_ held: the outbox is taken under it, so a reply the writer
  // only partly sent (its rest queued first) goes out before any other.
  bool SendOutboxLocked() {
    std::vector<std::vector<uint8_t>> batch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch.swap(outbox_);
      hasOutbox_.store(false);
    }
    for (auto& b : batch) {
      struct iovec iov = {b.data(), b.size()};
      if (!SendAll(&iov, 1)) return false;
    }
    return true;
  }

  // Whether waiting for `ev` must end: any wait on a hard stop; a wait to
  // read on any stop; a wait to send once the graceful stop's time is up.
  bool WaitEnds(short ev) {
    if (aborting_.load()) return true;
    if (!stopping_.load()) return false;
    return ev == POLLIN || DrainMsLeft() <= 0;
  }

  // With stopping_ set: milliseconds left to answer what was carried out.
  int DrainMsLeft() {
    std::lock_guard<std::mutex> lock(mu_);
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(drainDeadline_ - std::chrono::steady_clock::now()).count();
    return left <= 0 ? 0 : static_cast<int>(left);
  }

  // Waits until the socket is ready for `events`, serving queued replies
  // meanwhile. False on stop (see WaitEnds) or socket error.
  bool WaitIo(short ev) {
    for (;;) {
      if (WaitEnds(ev)) return false;
      if (hasOutbox_.load() && ev == POLLIN && !SendOutbox()) return false;
      struct pollfd fds[2] = {{sock_, ev, 0}, {wakeFd_, POLLIN, 0}};
      int n = poll(fds, 2, stopping_.load() ? DrainMsLeft() : -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        return false;
      }
      if (n == 0) continue;
      if (fds[1].revents & POLLIN) {
        uint64_t v;
        ssize_t ignored = read(wakeFd_, &v, sizeof v);
        (void)ignored;
        continue;
      }
      if (fds[0].revents & (ev | POLLERR | POLLHUP | POLLNVAL)) return true;
    }
  }

  bool SendAll(struct iovec* iov, int count) {
    while (count > 0) {
      struct msghdr msg;
      std::memset(&msg, 0, sizeof msg);
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(count);
      ssize_t n = sendmsg(sock_, &msg, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          if (!WaitIo(POLLOUT)) return false;
          continue;
        }
        return false;
      }
      size_t left = static_cast<size_t>(n);
      while (count > 0 && left >= iov->iov_len) {
        left -= iov->iov_len;
        iov++;
        count--;
      }
      if (count > 0) {
        iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
        iov->iov_len -= left;
      }
    }
    return true;
  }

  bool SendReply(uint32_t error, const uint8_t* handle, const uint8_t* data, size_t length) {
    uint8_t head[kReplyHeaderBytes];
    PutBe32(head, kSimpleReplyMagic);
    PutBe32(head + 4, error);
    std::memcpy(head + 8, handle, 8);
    if (error != 0) errorReplies++;
    struct iovec iov[2] = {{head, kReplyHeaderBytes}, {const_cast<uint8_t*>(data), length}};
    std::lock_guard<std::mutex> send(sendMu_);
    if (hasOutbox_.load() && !SendOutboxLocked()) return false;
    return SendAll(iov, data == nullptr ? 1 : 2);
  }

  // Reads exactly n bytes (dst == nullptr: throws them away). False on EOF,
  // error or stop, with reason_ set.
  bool ReadExact(uint8_t* dst, size_t n) {
    while (n > 0) {
      if (inPos_ < inLen_) {
        size_t take = inLen_ - inPos_ < n ? inLen_ - inPos_ : n;
        if (dst != nullptr) {
          std::memcpy(dst, in_.data() + inPos_, take);
          dst += take;
        }
        inPos_ += take;
        n -= take;
        continue;
      }
      inPos_ = inLen_ = 0;
      const bool direct = dst != nullptr && n >= kDirectReadBytes;
      ssize_t r = direct ? recv(sock_, dst, n, 0) : recv(sock_, in_.data(), in_.size(), 0);
      if (r > 0) {
        if (direct) {
          dst += r;
          n -= static_cast<size_t>(r);
        } else {
          inLen_ = static_cast<size_t>(r);
        }
        continue;
      }
      if (r == 0) {
        reason_ = kExitPeerClosed;
        return false;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!WaitIo(POLLIN)) {
          reason_ = stopping_.load() ? kExitStopped : kExitSocketError;
          return false;
        }
        continue;
      }
      reason_ = kExitSocketError;
      return false;
    }
    return true;
  }

  // A reply made off this thread (by the writer): sent by this thread.
  void QueueReply(uint32_t error, const uint8_t* handle) {
    uint8_t head[kReplyHeaderBytes];
    PutBe32(head, kSimpleReplyMagic);
    PutBe32(head + 4, error);
    std::memcpy(head + 8, handle, 8);
    if (error != 0) errorReplies++;
    size_t sent = 0;
    // Sent at once when the socket is free and takes it without waiting:
    // handing every reply to the connection thread delayed it behind
    // whatever that thread was doing (a log append, a receive).
    std::unique_lock<std::mutex> send(sendMu_, std::try_to_lock);
    // After exited_ the socket is JavaScript's again (and may be closed).
    if (send.owns_lock() && exited_.load()) return;
    if (send.owns_lock() && !hasOutbox_.load()) {
      ssize_t n = ::send(sock_, head, kReplyHeaderBytes, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n == static_cast<ssize_t>(kReplyHeaderBytes)) return;
      if (n > 0) sent = static_cast<size_t>(n);
      else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return;  // broken: the thread sees it too
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (exited_.load()) return;
    if (sent > 0) {
      // The rest of a partly sent reply goes first (sendMu_ is still held).
      outbox_.emplace(outbox_.begin(), head + sent, head + kReplyHeaderBytes);
    } else {
      outbox_.emplace_back(head, head + kReplyHeaderBytes);
    }
    hasOutbox_.store(true);
    cv_.notify_all();
    Wake();
  }

  // A payload buffer of at least `length` bytes, within the connection's
  // bounds; waits for the writer to return one. nullptr on stop.
  std::unique_ptr<AlignedBuffer> AcquirePayload(size_t length) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!outbox_.empty()) {
        lock.unlock();
        bool ok = SendOutbox();
        lock.lock();
        if (!ok) return nullptr;
        continue;
      }
      if (stopping_.load()) return nullptr;
      if (payloadsOut_ == 0 || (payloadsOut_ < kMaxPayloads && payloadBytesOut_ + length <= kMaxPayloadBytes)) break;
      cv_.wait(lock);
    }
    std::unique_ptr<AlignedBuffer> p;
    if (!freePayloads_.empty()) {
      p = std::move(freePayloads_.back());
      freePayloads_.pop_back();
    } else {
      p = std::make_unique<AlignedBuffer>();
    }
    lock.unlock();
    if (p->size() < length) p->resize(length);
    lock.lock();
    payloadsOut_++;
    payloadBytesOut_ += p->size();
    return p;
  }

  void ReleasePayload(std::unique_ptr<AlignedBuffer> p) {
    std::lock_guard<std::mutex> lock(mu_);
    payloadsOut_--;
    payloadBytesOut_ -= p->size();
    if (p->capacity() <= kKeepPayloadBytes && freePayloads_.size() < static_cast<size_t>(kMaxPayloads)) freePayloads_.push_back(std::move(p));
    cv_.notify_all();
  }

  // Waits until every queued write of this connection has been carried out,
  // sending their replies when `reply`. Once stopping, the wait is bounded by
  // the stop's deadline (a write still queued then is answered by nobody;
  // its completion no longer touches the socket, see exited_).
  void WaitJobsDone(bool reply) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (reply && !outbox_.empty() && !aborting_.load()) {
        lock.unlock();
        if (!SendOutbox()) reply = false;
        lock.lock();
        continue;
      }
      // A hard stop lets go at once, as hardDisconnect says: what is still
      // queued completes without this thread (see exited_ and Post).
      if (connJobs_ == 0 || aborting_.load()) return;
      if (!stopping_.load()) {
        cv_.wait(lock);
      } else if (cv_.wait_until(lock, drainDeadline_) == std::cv_status::timeout && connJobs_ > 0) {
        return;
      }
    }
  }

  // Bounds the FLUSH (and FUA) requests JavaScript is working on: past
  // kMaxPendingJs the thread reads nothing more until replies come back.
  bool WaitPendingJsBelowLimit() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!outbox_.empty()) {
        lock.unlock();
        bool ok = SendOutbox();
        lock.lock();
        if (!ok) return false;
        continue;
      }
      if (stopping_.load()) return false;
      if (pendingJs_ < kMaxPendingJs) {
        pendingJs_++;
        return true;
      }
      cv_.wait(lock);
    }
  }

  // Waits for JavaScript's resume(), serving queued replies meanwhile. -1 on stop.
  int WaitResume() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!outbox_.empty()) {
        lock.unlock();
        bool ok = SendOutbox();
        lock.lock();
        if (!ok) return -1;
        continue;
      }
      if (stopping_.load()) return -1;
      if (resumed_) {
        resumed_ = false;
        return resumeError_;
      }
      cv_.wait(lock);
    }
  }

  uint32_t CheckRange(uint64_t offset, uint64_t length, bool limitLength, uint32_t pastEnd) const {
    const ExportCore& e = *exp_;
    if (limitLength && length > e.maxBlockBytes) return kNbdEinval;
    if (e.minBlockBytes > 1 && (offset % e.minBlockBytes != 0 || length % e.minBlockBytes != 0)) return kNbdEinval;
    if (offset > e.sizeBytes || length > e.sizeBytes - offset) return pastEnd;
    return 0;
  }

  // Records one validated WRITE, queues it for the export's writer thread
  // and (logging) appends it to the log; the writer then writes the disk and
  // answers it. Returns 0 when
  // queued, an NBD error when refused before anything was logged (the
  // payload is returned then), or -1 when the connection is stopping.
  int DoWrite(uint64_t offset, std::unique_ptr<AlignedBuffer>& payload, size_t length, const uint8_t* handle, bool fua) {
    ExportCore& e = *exp_;
    std::unique_lock<std::mutex> lock(e.mu);
    for (;;) {
      for (;;) {
        if (stopping_.load() || e.closed) return -1;
        const bool waitLog = e.mode == kModeLogging && e.attention != 0;
        const bool queueFull = !e.jobs.empty() && e.jobBytes + length > e.maxJobBytes;
        if (e.holdCount == 0 && !waitLog && !queueFull && e.records.size() < e.maxRecordPairs) break;
        e.cv.wait(lock);
      }
      if (e.mode == kModeRefuse) return static_cast<int>(kNbdEio);
      if (e.mode == kModeUntracked || e.durable.empty()) break;
      bool durable = true;
      for (uint64_t r = offset >> kIntentRegionShift; r <= (offset + length - 1) >> kIntentRegionShift; r++) {
        if (r >= e.durable.size() || e.durable[r] == 0) {
          durable = false;
          break;
        }
      }
      if (durable) break;
      // The region's write intent is not durable yet: JavaScript marks it.
      lock.unlock();
      Post({kEventIntent, kCmdWrite, 0, 0, 0, static_cast<double>(offset), static_cast<double>(length), 0});
      int err = WaitResume();
      if (err < 0) return -1;
      if (err != 0) return static_cast<int>(kNbdEio);
      lock.lock();
    }
    if (e.mode != kModeUntracked) {
      if (e.records.empty()) e.recordsSince = std::chrono::steady_clock::now();
      e.records.push_back(static_cast<double>(offset));
      e.records.push_back(static_cast<double>(length));
      e.NotifyRecords();
    }
    auto job = std::make_shared<WriteJob>();
    job->conn = shared_from_this();
    job->payload = std::move(payload);
    job->offset = offset;
    job->length = length;
    std::memcpy(job->handle, handle, 8);
    job->fua = fua;
    {
      // Completed() lowers it under mu_ on the writer thread: raise it under
      // mu_ too, or an update is lost (a session that never ends, or a
      // thread that exits with a job queued). mu_ inside e.mu is safe:
      // nothing takes e.mu while holding mu_.
      std::lock_guard<std::mutex> jobsLock(mu_);
      connJobs_++;
    }
    if (e.mode == kModeLogging) job->log = e.log;
    e.jobBytes += length;
    e.jobs.push_back(job);
    if (job->log == nullptr) {
      e.writerCv.notify_one();
      return 0;
    }
    // The log append (a copy into the staging buffer and the checksum) runs
    // here, on the receiving thread, which mostly waits for the client,
    // rather than on the writer, the slowest stage at 64 KiB (10-20% more
    // IOPS measured). Appends keep queue order by turns, and the writer
    // writes the disk only once the job is logged, so log order is still
    // disk order. No lock is held during the append: nothing the main
    // thread does (a hold, taking records) waits for a log write.
    job->logged = false;
    const uint64_t seq = e.nextAppendSeq++;
    while (e.appendTurn != seq) e.appendCv.wait(lock);
    lock.unlock();
    const int logError = job->log->Append(job->offset, job->payload->data(), job->length, HrlAppenderCore::NowTimestamp());
    const uint64_t logSize = logError == 0 ? job->log->SizeBytes() : 0;
    lock.lock();
    job->logError = logError;
    job->logSize = logSize;
    job->logged = true;
    e.appendTurn++;
    e.appendCv.notify_all();
    e.writerCv.notify_all();
    return 0;
  }

  int DoRead(uint64_t offset, size_t length) {
    if (rbuf_.size() < length) rbuf_.resize(length);
    size_t done = 0;
    while (done < length) {
      ssize_t n = pread(exp_->diskFd, rbuf_.data() + done, length - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return static_cast<int>(kNbdEio);
      }
      if (n == 0) {
        // Past the end of a file that is shorter than the export: zeroes.
        std::memset(rbuf_.data() + done, 0, length - done);
        break;
      }
      done += static_cast<size_t>(n);
    }
    bytesRead += length;
    return 0;
  }

  int Loop() {
    uint8_t h[kRequestHeaderBytes];
    for (;;) {
      if (stopping_.load()) return kExitStopped;
      if (hasOutbox_.load() && !SendOutbox()) return stopping_.load() ? kExitStopped : kExitSocketError;
      if (!ReadExact(h, kRequestHeaderBytes)) return reason_;
      if (Be32(h) != kRequestMagic) return kExitBadMagic;
      const uint16_t flags = Be16(h + 4);
      const uint16_t type = Be16(h + 6);
      const uint8_t* handle = h + 8;
      const uint64_t offset = Be64(h + 16);
      const uint32_t length = Be32(h + 24);
      requests++;
      if (type == kCmdWrite) {
        uint32_t error = (flags & ~kFlagFua) != 0 ? kNbdEinval : CheckRange(offset, length, true, kNbdEnospc);
        if (error != 0) {
          // The payload follows regardless; throw it away so the stream stays framed.
          if (!ReadExact(nullptr, length)) return reason_;
          if (!SendReply(error, handle, nullptr, 0)) return Failed();
          continue;
        }
        if (length == 0) {
          if (!SendReply(0, handle, nullptr, 0)) return Failed();
          continue;
        }
        std::unique_ptr<AlignedBuffer> payload = AcquirePayload(length);
        if (payload == nullptr) return Failed();
        if (!ReadExact(payload->data(), length)) {
          ReleasePayload(std::move(payload));
          return reason_;
        }
        int result = DoWrite(offset, payload, length, handle, (flags & kFlagFua) != 0);
        if (payload != nullptr) ReleasePayload(std::move(payload));
        if (result < 0) return kExitStopped;
        if (result > 0 && !SendReply(static_cast<uint32_t>(result), handle, nullptr, 0)) return Failed();
        continue;
      }
      if (type == kCmdRead) {
        uint32_t error = (flags & ~kFlagFua) != 0 ? kNbdEinval : CheckRange(offset, length, true, kNbdEinval);
        if (error == 0 && length > 0) error = static_cast<uint32_t>(DoRead(offset, length));
        bool ok = error == 0 && length > 0 ? SendReply(0, handle, rbuf_.data(), length) : SendReply(error, handle, nullptr, 0);
        // A large read's buffer is not kept (up to the 32 MiB maximum per connection otherwise).
        if (rbuf_.size() > kKeepPayloadBytes) std::vector<uint8_t>().swap(rbuf_);
        if (!ok) return Failed();
        continue;
      }
      if (type == kCmdFlush) {
        if (!WaitPendingJsBelowLimit()) return Failed();
        Post({kEventFlush, type, flags, Be32(handle), Be32(handle + 4), 0, 0, 0});
        continue;
      }
      if (type == kCmdDisc) return kExitDisconnect;
      // TRIM, WRITE_ZEROES and anything else: JavaScript validates, carries
      // out and answers it while this connection waits, so a later request
      // cannot overtake it.
      Post({kEventSlow, type, flags, Be32(handle), Be32(handle + 4), static_cast<double>(offset), static_cast<double>(length), 0});
      if (WaitResume() < 0) return kExitStopped;
    }
  }

  int Failed() { return stopping_.load() ? kExitStopped : kExitSocketError; }

  const int sock_;
  const int wakeFd_;
  std::shared_ptr<ExportCore> exp_;
  std::vector<uint8_t> in_;
  size_t inPos_ = 0;
  size_t inLen_ = 0;
  std::vector<uint8_t> rbuf_;
  const bool tracked_ = exp_->tracked;
  int reason_ = kExitPeerClosed;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::vector<uint8_t>> outbox_;
  // Serialises writes to the socket (this thread's replies and the writer's).
  std::mutex sendMu_;
  std::atomic<bool> hasOutbox_{false};
  std::atomic<bool> stopping_{false};
  std::mutex postMu_;
  bool postsClosed_ = false;  // under postMu_
  bool envGone_ = false;      // under postMu_: the environment was torn down
  // A hard stop: nothing more is sent either.
  std::atomic<bool> aborting_{false};
  std::chrono::steady_clock::time_point drainDeadline_;  // under mu_, set by the first Stop
  int pendingJs_ = 0;  // FLUSH/FUA events posted and not yet answered (under mu_)
  int connJobs_ = 0;   // writes queued for the disk and not yet answered (under mu_)
  int payloadsOut_ = 0;
  size_t payloadBytesOut_ = 0;
  std::vector<std::unique_ptr<AlignedBuffer>> freePayloads_;
  bool resumed_ = false;
  int resumeError_ = 0;
  // Set once, under sendMu_ and mu_: the socket is JavaScript's from then on.
  std::atomic<bool> exited_{false};
};

// Carries out the queued writes in queue order, each once its connection
// thread has logged it (see DoWrite): the disk write, then the reply, so log
// order equals disk order; the connection threads go on receiving
// meanwhile. (A separate logger thread was measured slower: one more
// wake-up per write on two busy cores.)
void ExportCore::WriterLoop() {
  std::unique_lock<std::mutex> lock(mu);
  for (;;) {
    for (;;) {
      if (!jobs.empty()) {
        if (jobs.front()->logged) break;
        // Its connection thread is still appending it to the log (even when closing).
        writerCv.wait(lock);
        continue;
      }
      if (closed) return;
      if (records.empty() || notifyPending) {
        writerCv.wait(lock);
        continue;
      }
      // Idle with records not yet handed over: they go once old enough.
      writerCv.wait_until(lock, recordsSince + kRecordsAgeMs);
      NotifyRecords();
    }
    std::shared_ptr<WriteJob> job = std::move(jobs.front());
    jobs.pop_front();
    writing = true;
    const int logError = job->logError;
    const uint64_t logSize = job->logSize;
    lock.unlock();
    const int diskError = PwriteAll(diskFd, job->payload->data(), job->length, job->offset);
    lock.lock();
    writing = false;
    jobBytes -= job->length;
    if (logError != 0) {
      // The tracker folds its logs into the resync map, as for any log I/O
      // error; the write itself went on (the map records it).
      if (attention != 2) {
        attention = 2;
        attentionErrno = logError;
      }
      Notify();
    } else if (job->log != nullptr && job->log == log && logSize > logLimitBytes && attention == 0) {
      attention = 1;
      Notify();
    }
    // Holds wait for an empty queue; connections for room in it.
    cv.notify_all();
    SignalHeld();
    lock.unlock();
    job->conn->Completed(*job, diskError);
    job.reset();
    lock.lock();
  }
}

const napi_type_tag kExportTag = {0x3d5e7a9c1b2f4e60ull, 0x8a7b6c5d4e3f2a10ull};

Napi::Float64Array TakeRecords(Napi::Env env, ExportCore& e) {
  std::vector<double> taken;
  {
    std::lock_guard<std::mutex> lock(e.mu);
    taken.swap(e.records);
    e.notifyPending = false;
    e.cv.notify_all();
  }
  Napi::Float64Array out = Napi::Float64Array::New(env, taken.size());
  if (!taken.empty()) std::memcpy(out.Data(), taken.data(), taken.size() * sizeof(double));
  return out;
}

void ExportCore::ResolveHolds(Napi::Env env) {
  {
    std::lock_guard<std::mutex> lock(mu);
    heldSignalPending = false;
    if (!Idle() && !closed) return;  // the writer signals again once it is
    pendingHolds = 0;
  }
  if (holdDeferreds.empty()) return;
  std::vector<Napi::Promise::Deferred> ready;
  ready.swap(holdDeferreds);
  if (closeDeferreds.empty()) held.Unref(env);
  // The first gets the records; any later one finds them taken already.
  for (auto& d : ready) d.Resolve(TakeRecords(env, *this));
}

void ExportCore::FinishClose(Napi::Env env) {
  if (writer.joinable()) writer.join();  // it has left WriterLoop: at once
  std::vector<Napi::Promise::Deferred> done;
  done.swap(closeDeferreds);
  if (!closeSettled) {
    closeSettled = true;
    // The writer is gone, so pending holds are settled here.
    ResolveHolds(env);
    held.Unref(env);
    notify.Release();
    held.Release();
    RemoveTeardownHook(env);
  }
  for (auto& d : done) d.Resolve(env.Undefined());
}

void ExportCore::TeardownHook(void* arg) {
  auto* weak = static_cast<std::weak_ptr<ExportCore>*>(arg);
  if (std::shared_ptr<ExportCore> c = weak->lock()) {
    std::lock_guard<std::mutex> lock(c->mu);
    c->teardownHookArg = nullptr;
    c->finalized = true;
    c->closed = true;
    c->cv.notify_all();
    c->writerCv.notify_all();
    c->appendCv.notify_all();
  }
  delete weak;
}

void ExportCore::RemoveTeardownHook(napi_env env) {
  std::weak_ptr<ExportCore>* arg = teardownHookArg;
  teardownHookArg = nullptr;
  if (arg == nullptr) return;
  napi_remove_env_cleanup_hook(env, TeardownHook, arg);
  delete arg;
}

class TapExportWrap : public Napi::ObjectWrap<TapExportWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "TapExport",
                       {
                           InstanceMethod<&TapExportWrap::HoldJs>("hold"),
                           InstanceMethod<&TapExportWrap::ReleaseJs>("release"),
                           InstanceMethod<&TapExportWrap::DrainJs>("drain"),
                           InstanceMethod<&TapExportWrap::SetDurableRegionsJs>("setDurableRegions"),
                           InstanceMethod<&TapExportWrap::AttentionJs>("attention"),
                           InstanceMethod<&TapExportWrap::CloseJs>("close"),
                       });
  }

  // new TapExport(diskFd, sizeBytes, minBlockBytes, maxBlockBytes, tracked, notify)
  explicit TapExportWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TapExportWrap>(info) {
    Napi::Env env = info.Env();
    double fd, size, minBlock, maxBlock;
    if (!NumberArg(info, 0, 1 << 30, fd) || !NumberArg(info, 1, kMaxSafe, size) || !NumberArg(info, 2, 65536, minBlock) ||
        !NumberArg(info, 3, 4294967295.0, maxBlock) || minBlock < 1 || info.Length() < 6 || !info[4].IsBoolean() || !info[5].IsFunction()) {
      Napi::TypeError::New(env, "TapExport(diskFd, sizeBytes, minBlockBytes, maxBlockBytes, tracked, notify): bad argument").ThrowAsJavaScriptException();
      return;
    }
    const int ownFd = fcntl(static_cast<int>(fd), F_DUPFD_CLOEXEC, 0);
    if (ownFd < 0) {
      Napi::Error::New(env, std::string("TapExport: cannot duplicate the disk descriptor: ") + std::strerror(errno)).ThrowAsJavaScriptException();
      return;
    }
    core_ = std::make_shared<ExportCore>();
    core_->diskFd = ownFd;
    core_->sizeBytes = static_cast<uint64_t>(size);
    core_->minBlockBytes = static_cast<uint32_t>(minBlock);
    core_->maxBlockBytes = static_cast<uint32_t>(maxBlock);
    core_->tracked = info[4].As<Napi::Boolean>().Value();
    if (!core_->tracked) core_->holdCount = 0;
    core_->notify = Napi::ThreadSafeFunction::New(env, info[5].As<Napi::Function>(), "blockrelay-tap-export", 0, 1);
    core_->notify.Unref(env);
    // Referenced only while a hold waits, so a pending hold keeps the process alive.
    core_->self = core_;
    core_->held = Napi::ThreadSafeFunction::New(
        env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "blockrelay-tap-held", 0, 1, [](Napi::Env) {});
    core_->held.Unref(env);
    // The thread keeps the core alive: a finalized wrap only detaches it, so
    // a write stuck on a hung disk never blocks the main thread.
    core_->teardownHookArg = new std::weak_ptr<ExportCore>(core_);
    napi_add_env_cleanup_hook(env, ExportCore::TeardownHook, core_->teardownHookArg);
    std::shared_ptr<ExportCore> keep = core_;
    core_->writer = std::thread([keep]() {
      pthread_setname_np(pthread_self(), "br-tap-writer");
      keep->WriterLoop();
      std::lock_guard<std::mutex> lock(keep->mu);
      keep->writerExited = true;
      if (keep->finalized) return;
      keep->held.NonBlockingCall([keep](Napi::Env env, Napi::Function) { keep->FinishClose(env); });
    });

    napi_type_tag_object(env, info.This(), &kExportTag);
  }

  ~TapExportWrap() override {
    if (core_ == nullptr) return;
    // A finalizer neither waits for the writer (a hung disk would stop the
    // GC's thread) nor settles or releases anything: at the environment's
    // teardown Node closes the thread-safe functions itself, and releasing
    // one it already closed aborted the process. Both are unreferenced, so
    // leaving them keeps nothing alive; the thread ends on its own.
    std::lock_guard<std::mutex> lock(core_->mu);
    core_->closed = true;
    core_->cv.notify_all();
    core_->writerCv.notify_all();
    core_->appendCv.notify_all();
    core_->holdDeferreds.clear();
    // A close still pending is settled when the writer ends, as usual, and
    // the teardown hook stays for it; otherwise nothing is posted any more.
    if (core_->closeDeferreds.empty()) {
      core_->finalized = true;
      core_->RemoveTeardownHook(Env());
    }
    if (core_->writer.joinable()) core_->writer.detach();
  }

  std::shared_ptr<ExportCore> core() const { return core_; }

 private:
  // Stops the writer once its queue is empty; the promise resolves when it
  // has ended. The main thread never waits for it: with a write stuck on a
  // hung disk, that is when the disk answers.
  Napi::Promise CloseCore(Napi::Env env) {
    Napi::Promise::Deferred deferred = Napi::Promise::Deferred::New(env);
    Napi::Promise promise = deferred.Promise();
    bool exited;
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->closed = true;
      core_->cv.notify_all();
      core_->writerCv.notify_all();
      exited = core_->writerExited;
    }
    // Referenced while a close waits, so its promise settles before the process can exit.
    if (core_->closeDeferreds.empty() && !core_->closeSettled) core_->held.Ref(env);
    core_->closeDeferreds.push_back(deferred);
    // Already ended: its signal may still be queued (FinishClose runs once).
    if (exited) core_->FinishClose(env);
    return promise;
  }

  // Stops new writes and resolves, with the records not yet taken, once the
  // queued ones are on the disk (at once when none are), so what JavaScript
  // does next (a mutation, a cut) comes after them on the disk as in the log.
  Napi::Value HoldJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Promise::Deferred deferred = Napi::Promise::Deferred::New(env);
    Napi::Promise promise = deferred.Promise();
    bool idle;
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->holdCount++;
      idle = core_->Idle() || core_->closed;
      if (!idle) core_->pendingHolds++;
    }
    if (idle) {
      deferred.Resolve(TakeRecords(env, *core_));
      return promise;
    }
    if (core_->holdDeferreds.empty()) core_->held.Ref(env);
    core_->holdDeferreds.push_back(deferred);
    {
      // The queue may have emptied between the check and here: signal for it.
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->SignalHeld();
    }
    return promise;
  }

  // release(mode, appender | null, logLimitBytes, handledAttention = 0): ends
  // one hold and sets what writes do next. The attention flag concerns the
  // log: it goes when the log or the mode changes, and otherwise only when the
  // caller says it dealt with that very kind (an unrelated release, a flush's,
  // must not clear an overflow the tracker has not seen yet).
  Napi::Value ReleaseJs(const Napi::CallbackInfo& info) {
    double mode, limit, handled = 0;
    if (!NumberArg(info, 0, 3, mode) || info.Length() < 3 || !info[2].IsNumber() ||
        (info.Length() > 3 && !info[3].IsUndefined() && !NumberArg(info, 3, 2, handled))) {
      Napi::TypeError::New(info.Env(), "release(mode, appender, logLimitBytes, handledAttention): bad argument").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    limit = info[2].As<Napi::Number>().DoubleValue();
    std::shared_ptr<HrlAppenderCore> log = HrlAppenderCoreOf(info[1]);
    std::lock_guard<std::mutex> lock(core_->mu);
    if (core_->holdCount > 0) core_->holdCount--;
    const int previousMode = core_->mode;
    const std::shared_ptr<HrlAppenderCore> previousLog = core_->log;
    core_->mode = static_cast<int>(mode);
    // Logging without a log to append to would write unrecorded data: refuse instead.
    if (core_->mode == kModeLogging && log == nullptr) core_->mode = kModeRefuse;
    core_->log = core_->mode == kModeLogging ? log : nullptr;
    core_->logLimitBytes = !(limit >= 0) ? 0 : limit >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(limit);
    const bool logChanged = core_->mode != kModeLogging || core_->mode != previousMode || core_->log != previousLog;
    if (logChanged || (handled != 0 && core_->attention == static_cast<int>(handled))) {
      core_->attention = 0;
      core_->attentionErrno = 0;
    }
    core_->cv.notify_all();
    return info.Env().Undefined();
  }

  Napi::Value DrainJs(const Napi::CallbackInfo& info) { return TakeRecords(info.Env(), *core_); }

  // setDurableRegions(Float64Array of region numbers): replaces the set.
  Napi::Value SetDurableRegionsJs(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
      Napi::TypeError::New(info.Env(), "setDurableRegions(Float64Array)").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    Napi::Float64Array regions = info[0].As<Napi::Float64Array>();
    const uint64_t count = (core_->sizeBytes + (1ull << kIntentRegionShift) - 1) >> kIntentRegionShift;
    std::lock_guard<std::mutex> lock(core_->mu);
    core_->durable.assign(static_cast<size_t>(count == 0 ? 1 : count), 0);
    for (size_t i = 0; i < regions.ElementLength(); i++) {
      double r = regions[i];
      if (r >= 0 && r < static_cast<double>(count)) core_->durable[static_cast<size_t>(r)] = 1;
    }
    return info.Env().Undefined();
  }

  // [kind (0 none, 1 overflow, 2 log I/O error), errno]
  Napi::Value AttentionJs(const Napi::CallbackInfo& info) {
    Napi::Float64Array out = Napi::Float64Array::New(info.Env(), 2);
    std::lock_guard<std::mutex> lock(core_->mu);
    out[0] = core_->attention;
    out[1] = core_->attentionErrno;
    return out;
  }

  Napi::Value CloseJs(const Napi::CallbackInfo& info) { return CloseCore(info.Env()); }

  std::shared_ptr<ExportCore> core_;
};

class TapConnectionWrap : public Napi::ObjectWrap<TapConnectionWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "TapConnection",
                       {
                           InstanceMethod<&TapConnectionWrap::ReplyJs>("reply"),
                           InstanceMethod<&TapConnectionWrap::ResumeJs>("resume"),
                           InstanceMethod<&TapConnectionWrap::StopJs>("stop"),
                           InstanceMethod<&TapConnectionWrap::JoinJs>("join"),
                           InstanceMethod<&TapConnectionWrap::StatsJs>("stats"),
                       });
  }

  // new TapConnection(socketFd, tapExport, prefix: Uint8Array, onEvent)
  explicit TapConnectionWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TapConnectionWrap>(info) {
    Napi::Env env = info.Env();
    double fd;
    bool tagged = false;
    if (!NumberArg(info, 0, 1 << 30, fd) || info.Length() < 4 || !info[1].IsObject() || !info[2].IsTypedArray() || !info[3].IsFunction() ||
        napi_check_object_type_tag(env, info[1], &kExportTag, &tagged) != napi_ok || !tagged) {
      Napi::TypeError::New(env, "TapConnection(socketFd, tapExport, prefix, onEvent): bad argument").ThrowAsJavaScriptException();
      return;
    }
    std::shared_ptr<ExportCore> exp = TapExportWrap::Unwrap(info[1].As<Napi::Object>())->core();
    Napi::TypedArray arr = info[2].As<Napi::TypedArray>();
    const uint8_t* p = static_cast<const uint8_t*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
    std::vector<uint8_t> prefix(p, p + arr.ByteLength());
    int wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake < 0) {
      Napi::Error::New(env, std::string("eventfd failed: ") + std::strerror(errno)).ThrowAsJavaScriptException();
      return;
    }
    core_ = std::make_shared<ConnCore>(static_cast<int>(fd), wake, exp, std::move(prefix));
    core_->events = Napi::ThreadSafeFunction::New(env, info[3].As<Napi::Function>(), "blockrelay-tap-connection", 0, 1);
    core_->teardownHookArg = new std::weak_ptr<ConnCore>(core_);
    napi_add_env_cleanup_hook(env, ConnCore::TeardownHook, core_->teardownHookArg);
    std::shared_ptr<ConnCore> c = core_;
    core_->thread = std::thread([c]() {
      pthread_setname_np(pthread_self(), "br-tap-conn");
      c->Run();
    });
  }

  ~TapConnectionWrap() override {
    if (core_ == nullptr) return;
    if (core_->thread.joinable()) {
      // Still running: the teardown hook stays for it.
      core_->Stop(false);
      core_->thread.detach();
    } else {
      core_->RemoveTeardownHook(Env());
    }
  }

 private:
  Napi::Value ReplyJs(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsTypedArray()) {
      Napi::TypeError::New(info.Env(), "reply(bytes)").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    Napi::TypedArray arr = info[0].As<Napi::TypedArray>();
    const uint8_t* p = static_cast<const uint8_t*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
    return Napi::Boolean::New(info.Env(), core_ != nullptr && core_->Reply(p, arr.ByteLength()));
  }

  Napi::Value ResumeJs(const Napi::CallbackInfo& info) {
    double err = 0;
    if (info.Length() > 0) NumberArg(info, 0, 1 << 30, err);
    if (core_ != nullptr) core_->Resume(static_cast<int>(err));
    return info.Env().Undefined();
  }

  // stop(graceful): graceful answers what was already carried out first.
  Napi::Value StopJs(const Napi::CallbackInfo& info) {
    const bool graceful = info.Length() > 0 && info[0].IsBoolean() && info[0].As<Napi::Boolean>().Value();
    if (core_ != nullptr) core_->Stop(graceful);
    return info.Env().Undefined();
  }

  // After the exit event: the thread has finished, so this does not block for long.
  Napi::Value JoinJs(const Napi::CallbackInfo& info) {
    if (core_ != nullptr && core_->thread.joinable() && core_->thread.get_id() != std::this_thread::get_id()) {
      core_->thread.join();
      core_->RemoveTeardownHook(info.Env());
    }
    return info.Env().Undefined();
  }

  // [requests, errorReplies, bytesWritten, bytesRead]
  Napi::Value StatsJs(const Napi::CallbackInfo& info) {
    Napi::Float64Array out = Napi::Float64Array::New(info.Env(), 4);
    if (core_ == nullptr) return out;
    out[0] = static_cast<double>(core_->requests.load());
    out[1] = static_cast<double>(core_->errorReplies.load());
    out[2] = static_cast<double>(core_->bytesWritten.load());
    out[3] = static_cast<double>(core_->bytesRead.load());
    return out;
  }

  std::shared_ptr<ConnCore> core_;
};

// exitNow(status): ends the process at once. process.exit() runs the exit
// handlers, and libuv's joins its pool threads: after a stop that ran out of
// time (a disk that hangs), one of them may sit in an fdatasync of that disk
// until the disk answers, and the process with it. Nothing buffered is lost:
// Node writes stderr to pipes and files synchronously.
Napi::Value ExitNowJs(const Napi::CallbackInfo& info) {
  double status;
  if (!NumberArg(info, 0, 255, status)) {
    Napi::TypeError::New(info.Env(), "exitNow(status): status must be a whole number from 0 to 255").ThrowAsJavaScriptException();
    return info.Env().Undefined();
  }
  _exit(static_cast<int>(status));
}

// The threads of this file may outlive the environment that started them:
// a worker thread that ends while one of its exports' writers is in a write
// to a hung disk. Node unloads an addon with the last environment that
// loaded it, which would unmap the code that writer still runs when the
// disk answers. The library is pinned for the life of the process instead.
void PinLibrary() {
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&PinLibrary), &info) != 0 && info.dli_fname != nullptr) {
      (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
    }
  });
}

}  // namespace

void InitTapTransmission(Napi::Env env, Napi::Object exports) {
  PinLibrary();
  exports.Set("TapExport", TapExportWrap::Define(env));
  exports.Set("TapConnection", TapConnectionWrap::Define(env));
  exports.Set("exitNow", Napi::Function::New(env, ExitNowJs, "exitNow"));
}

}  // namespace blockrelay

#else  // !defined(__linux__)

namespace blockrelay {

void InitTapTransmission(Napi::Env, Napi::Object) {}

}  // namespace blockrelay

#endif
