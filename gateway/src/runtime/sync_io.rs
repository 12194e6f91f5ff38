//! Plain (non-async) definitions of the `wasi:io` functions that Wasmtime's WASI defines as
//! async, for the linker that plugin calls without a fiber are made through.
//!
//! Wasmtime can call a component without a fiber only if every function it imports is a plain
//! host function. Rust's standard library makes each plugin import a few `wasi:io` functions that
//! may wait (`pollable.block`, `output-stream.blocking-flush`, the stream destructors), so as
//! `wasmtime-wasi` defines them, every plugin would need a fiber for every call. In a plugin's
//! sandbox nothing they wait on ever has to wait: stdin is empty, stdout a sink, stderr a
//! bounded in-memory pipe, and no socket, file or clock subscription is granted to a plugin
//! linked this way (`needs_fiber`). So each definition here runs `wasmtime-wasi`'s own
//! implementation and polls it once. Should it ever not be ready, the call traps with a clear
//! message instead of blocking a worker thread.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use wasmtime::component::{Linker, Resource, ResourceTable, ResourceType, types::ComponentItem};
use wasmtime::{Engine, StoreContextMut};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};
use wasmtime_wasi_io::bindings::wasi::io::poll::{Host as _, HostPollable};
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    self as streams, Host as _, HostInputStream, HostOutputStream,
};
use wasmtime_wasi_io::streams::StreamError;

use super::PluginState;

/// The `wasi:io` version `wasmtime-wasi` defines (components importing any 0.2.x link to it).
const POLL: &str = "wasi:io/poll@0.2.12";
const STREAMS: &str = "wasi:io/streams@0.2.12";

/// What a call learns when one of these functions would have had to wait.
const WOULD_WAIT: &str = "a plugin waited on WASI I/O that is never ready in its sandbox";

/// Runs `future` to completion if it completes at its first poll.
fn at_once<T>(future: impl Future<Output = wasmtime::Result<T>>) -> wasmtime::Result<T> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => Err(wasmtime::format_err!("{WOULD_WAIT}")),
    }
}

/// A stream operation's result as the guest sees it: its error turned into a `stream-error`.
type StreamResult<T> = Result<T, streams::StreamError>;

/// Runs one of `wasmtime-wasi`'s stream operations on the store's table, polled once, and lowers
/// its error for the guest.
fn stream_op<T>(
    mut cx: StoreContextMut<'_, PluginState>,
    op: impl AsyncFnOnce(&mut ResourceTable) -> Result<T, StreamError>,
) -> wasmtime::Result<(StreamResult<T>,)> {
    let table = &mut cx.data_mut().table;
    match at_once(async { Ok(op(table).await) })? {
        Ok(value) => Ok((Ok(value),)),
        Err(err) => Ok((Err(table.convert_stream_error(err)?),)),
    }
}

/// Redefines, in `linker` (which already has `wasmtime-wasi`'s async definitions), every
/// `wasi:io` function and destructor that `wasmtime-wasi` defines as async.
pub(super) fn define(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);

    let mut poll = linker.instance(POLL)?;
    poll.func_wrap(
        "poll",
        |mut cx: StoreContextMut<'_, PluginState>, (list,): (Vec<Resource<DynPollable>>,)| {
            Ok((at_once(cx.data_mut().table.poll(list))?,))
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |mut cx: StoreContextMut<'_, PluginState>, (this,): (Resource<DynPollable>,)| {
            at_once(HostPollable::block(&mut cx.data_mut().table, this))
        },
    )?;
    poll.func_wrap(
        "[method]pollable.ready",
        |mut cx: StoreContextMut<'_, PluginState>, (this,): (Resource<DynPollable>,)| {
            Ok((at_once(HostPollable::ready(
                &mut cx.data_mut().table,
                this,
            ))?,))
        },
    )?;

    let mut streams = linker.instance(STREAMS)?;
    streams.resource(
        "input-stream",
        ResourceType::host::<DynInputStream>(),
        |mut cx, rep| {
            at_once(HostInputStream::drop(
                &mut cx.data_mut().table,
                Resource::new_own(rep),
            ))
        },
    )?;
    streams.resource(
        "output-stream",
        ResourceType::host::<DynOutputStream>(),
        |mut cx, rep| {
            at_once(HostOutputStream::drop(
                &mut cx.data_mut().table,
                Resource::new_own(rep),
            ))
        },
    )?;
    streams.func_wrap(
        "[method]input-stream.blocking-read",
        |cx, (this, len): (Resource<DynInputStream>, u64)| {
            stream_op(cx, async |table| {
                HostInputStream::blocking_read(table, this, len).await
            })
        },
    )?;
    streams.func_wrap(
        "[method]input-stream.blocking-skip",
        |cx, (this, len): (Resource<DynInputStream>, u64)| {
            stream_op(cx, async |table| {
                HostInputStream::blocking_skip(table, this, len).await
            })
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-flush",
        |cx, (this,): (Resource<DynOutputStream>,)| {
            stream_op(cx, async |table| {
                HostOutputStream::blocking_flush(table, this).await
            })
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-and-flush",
        |cx, (this, bytes): (Resource<DynOutputStream>, Vec<u8>)| {
            stream_op(cx, async |table| {
                HostOutputStream::blocking_write_and_flush(table, this, bytes).await
            })
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-zeroes-and-flush",
        |cx, (this, len): (Resource<DynOutputStream>, u64)| {
            stream_op(cx, async |table| {
                HostOutputStream::blocking_write_zeroes_and_flush(table, this, len).await
            })
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-splice",
        |cx, (this, from, len): (Resource<DynOutputStream>, Resource<DynInputStream>, u64)| {
            stream_op(cx, async |table| {
                HostOutputStream::blocking_splice(table, this, from, len).await
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Whether a component imports something that may really wait in a plugin's sandbox, or that
/// [`define`] does not make plain: a clock subscription (a plugin that sleeps), or anything from
/// `wasi:filesystem` (async in `wasmtime-wasi`; no plugin is given a directory, but the
/// functions are linked). Such a plugin's calls always run on a fiber.
pub(super) fn needs_fiber(engine: &Engine, component: &wasmtime::component::Component) -> bool {
    component
        .component_type()
        .imports(engine)
        .any(|(name, item)| {
            let unversioned = name.split('@').next().unwrap_or(name);
            if unversioned.starts_with("wasi:filesystem/") {
                return true;
            }
            if unversioned != "wasi:clocks/monotonic-clock" {
                return false;
            }
            match item.ty {
                ComponentItem::ComponentInstance(instance) => instance
                    .exports(engine)
                    .any(|(export, _)| export.starts_with("subscribe")),
                _ => true,
            }
        })
}
