//! Durable 1→1 throughput and latency over the Unix socket.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hermod_client::{Connection, FrameReader};
use hermod_core::model::Body;
use hermod_core::wire::{AckMode, ClientFrame, Outgoing, ServerFrame};

fn frame(to: &str, body: String) -> ClientFrame {
    ClientFrame::Send(Outgoing {
        to: Some(to.into()),
        from: Some("bench-tx".into()),
        body: Some(Body::from_json(body).expect("valid body")),
        ..Outgoing::default()
    })
}

/// Registers `name` and returns the reading half (the writer half is kept
/// alive by the caller so the connection stays open).
async fn receiver(socket: &Path, name: &str) -> Result<(FrameReader, hermod_client::FrameWriter)> {
    let mut c = Connection::connect(socket).await?;
    c.request(&ClientFrame::Register {
        endpoint: name.into(),
        channel: None,
        ack: Some(AckMode::Auto),
        gaps: None,
    })
    .await?;
    Ok(c.split())
}

/// `senders` connections to `socket` pipeline `messages` durable sends to
/// one receiver registered at `rx_socket` (the same daemon, or another
/// node of the bus).
pub(super) async fn throughput(
    socket: &Path,
    rx_socket: &Path,
    messages: u64,
    senders: u64,
) -> Result<()> {
    let rx_name = format!("bench-rx-{}", std::process::id());
    let (mut rx, _rx_w) = receiver(rx_socket, &rx_name).await?;
    let start = Instant::now();
    let (tasks, total) = senders_to(socket, &rx_name, messages, senders, start);
    let mut delivered = 0;
    while delivered < total {
        match rx.next_raw().await? {
            Some(_) => delivered += 1,
            None => bail!("receiver connection closed"),
        }
    }
    let delivered_in = start.elapsed();
    let mut durable_in = Duration::ZERO;
    for t in tasks {
        durable_in = durable_in.max(t.await??);
    }
    println!(
        "throughput: {total} durable messages, {senders} pipelining senders -> 1 receiver\n  \
         durable receipts: {:>9.0} msgs/s ({:.2} s)\n  \
         deliveries:       {:>9.0} msgs/s ({:.2} s)",
        total as f64 / durable_in.as_secs_f64(),
        durable_in.as_secs_f64(),
        total as f64 / delivered_in.as_secs_f64(),
        delivered_in.as_secs_f64(),
    );
    Ok(())
}

/// `senders` connections to `socket` pipeline `messages` durable sends to
/// `to`, nobody reading them; reports the receipts.
pub(super) async fn fill(socket: &Path, to: &str, messages: u64, senders: u64) -> Result<()> {
    let start = Instant::now();
    let (tasks, total) = senders_to(socket, to, messages, senders, start);
    let mut durable_in = Duration::ZERO;
    for t in tasks {
        durable_in = durable_in.max(t.await??);
    }
    println!(
        "fill: {total} durable messages to {to}, {senders} pipelining senders: {:.0} msgs/s ({:.2} s)",
        total as f64 / durable_in.as_secs_f64(),
        durable_in.as_secs_f64(),
    );
    Ok(())
}

/// The sending tasks of [`throughput`] and [`fill`], each answering how
/// long after `start` its last receipt came; and how many they send.
fn senders_to(
    socket: &Path,
    to: &str,
    messages: u64,
    senders: u64,
    start: Instant,
) -> (Vec<tokio::task::JoinHandle<Result<Duration>>>, u64) {
    let per_sender = messages / senders;
    let total = per_sender * senders;
    let pad = "x".repeat(64);
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (socket, rx_name, pad) = (socket.to_owned(), to.to_owned(), pad.clone());
        tasks.push(tokio::spawn(async move {
            let (mut reader, mut writer) = Connection::connect(&socket).await?.split();
            let write = tokio::spawn(async move {
                for n in 0..per_sender {
                    writer
                        .feed(&frame(
                            &rx_name,
                            format!(r#"{{"s":{s},"n":{n},"pad":"{pad}"}}"#),
                        ))
                        .await?;
                    if n % 64 == 63 {
                        writer.flush().await?;
                    }
                }
                writer.flush().await?;
                anyhow::Ok(writer)
            });
            let mut receipts = 0;
            while receipts < per_sender {
                match reader.next().await? {
                    Some(ServerFrame::Sent { .. }) => receipts += 1,
                    Some(ServerFrame::Error { code, detail, .. }) => bail!("{code}: {detail}"),
                    Some(_) => {}
                    None => bail!("daemon closed the connection"),
                }
            }
            let _writer = write.await??;
            anyhow::Ok(start.elapsed())
        }));
    }
    (tasks, total)
}

/// One sender on `socket` at `rate` msgs/s for `seconds`, to a receiver
/// registered at `rx_socket`.
pub(super) async fn latency(
    socket: &Path,
    rx_socket: &Path,
    rate: u64,
    seconds: u64,
) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Probe {
        body: ProbeBody,
    }
    #[derive(serde::Deserialize)]
    struct ProbeBody {
        t: u64,
    }

    let rx_name = format!("bench-lat-{}", std::process::id());
    let (mut rx, mut rx_w) = receiver(rx_socket, &rx_name).await?;
    // A registered endpoint silent for 90 s is dropped: a long run (the
    // soak) pings like a real client.
    let _pings = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if rx_w.send(&ClientFrame::Ping).await.is_err() {
                return;
            }
        }
    }));
    let epoch = Instant::now();
    let total = rate * seconds;
    let sent_at = Arc::new(std::sync::Mutex::new(VecDeque::with_capacity(
        total as usize,
    )));
    let (mut reader, mut writer) = Connection::connect(socket).await?.split();

    let send = {
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            // One tick per millisecond, sending whatever the schedule owes.
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut sent = 0u64;
            while sent < total {
                tick.tick().await;
                let due = ((epoch.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                while sent < due {
                    let t = epoch.elapsed().as_nanos() as u64;
                    sent_at.lock().unwrap().push_back(t);
                    writer
                        .feed(&frame(&rx_name, format!(r#"{{"t":{t}}}"#)))
                        .await?;
                    sent += 1;
                }
                writer.flush().await?;
            }
            anyhow::Ok(writer)
        })
    };
    let receipts = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(total as usize);
        while (lat.len() as u64) < total {
            match reader.next().await? {
                Some(ServerFrame::Sent { .. }) => {
                    let t0 = sent_at.lock().unwrap().pop_front().unwrap_or(0);
                    lat.push(epoch.elapsed().as_nanos() as u64 - t0);
                }
                Some(ServerFrame::Error { code, detail, .. }) => bail!("{code}: {detail}"),
                Some(_) => {}
                None => bail!("daemon closed the connection"),
            }
        }
        anyhow::Ok(lat)
    });
    let mut delivery = Vec::with_capacity(total as usize);
    while (delivery.len() as u64) < total {
        let Some(raw) = rx.next_raw().await? else {
            bail!("receiver connection closed")
        };
        // Anything but a probe (the pings' `pong`) is not a delivery.
        let Ok(probe) = serde_json::from_slice::<Probe>(&raw) else {
            continue;
        };
        delivery.push(epoch.elapsed().as_nanos() as u64 - probe.body.t);
    }
    let _writer = send.await??;
    let durable = receipts.await??;
    println!("latency: {total} messages at {rate} msgs/s, 1 sender -> 1 receiver");
    super::report("  send -> durable receipt", durable);
    super::report("  send -> delivered     ", delivery);
    Ok(())
}
