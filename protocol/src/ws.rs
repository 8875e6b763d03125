//! The client side of the exec WebSocket: an HTTP/1.1 upgrade made through
//! reqwest (so `https` endpoints work with the one TLS stack every part
//! already has), then a WebSocket over the upgraded connection.

use base64::Engine;
use reqwest::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// A WebSocket opened by [`upgrade`].
pub type ClientSocket = WebSocketStream<reqwest::Upgraded>;

/// Why a WebSocket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The request could not be sent or the connection broke.
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with an ordinary HTTP response (an error, usually).
    #[error("answered {status} instead of switching to WebSocket")]
    Refused {
        /// Its status.
        status: reqwest::StatusCode,
        /// Its body, for an [`crate::ApiError`] when it is one.
        body: String,
    },
    /// The server switched protocols but its handshake answer was wrong.
    #[error("answered the WebSocket handshake wrongly")]
    BadHandshake,
}

/// Send `request` (a GET carrying the caller's URL and credentials) as a
/// WebSocket upgrade and return the socket. It refuses messages larger than
/// [`crate::MAX_WS_MESSAGE_BYTES`], so a peer cannot make it buffer more.
pub async fn upgrade(request: reqwest::RequestBuilder) -> Result<ClientSocket, UpgradeError> {
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let resp = request
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_VERSION, "13")
        .header(SEC_WEBSOCKET_KEY, &key)
        .send()
        .await?;
    if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        // Read at most 64 KiB of an error body: enough for any `{code, message}`.
        let mut resp = resp;
        let mut body = Vec::new();
        while body.len() < 64 * 1024 {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                _ => break,
            }
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        return Err(UpgradeError::Refused { status, body });
    }
    let accepted = resp
        .headers()
        .get(SEC_WEBSOCKET_ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == derive_accept_key(key.as_bytes()));
    if !accepted {
        return Err(UpgradeError::BadHandshake);
    }
    let upgraded = resp.upgrade().await?;
    Ok(WebSocketStream::from_raw_socket(upgraded, Role::Client, Some(message_limits())).await)
}

/// Message and frame limits of an exec WebSocket (both legs, both directions).
pub fn message_limits() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(crate::MAX_WS_MESSAGE_BYTES))
        .max_frame_size(Some(crate::MAX_WS_MESSAGE_BYTES))
}
