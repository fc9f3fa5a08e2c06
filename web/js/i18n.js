// French and English strings. French is the default (the original was French);
// the browser's language decides unless the person picked one (kept in localStorage).

const STRINGS = {
  fr: {
    "lang.switch": "English",
    "lang.switch.label": "Switch to English",
    "start.title": "Rejoindre une consultation",
    "start.role": "Je suis",
    "role.patient": "un patient",
    "role.practitioner": "un praticien",
    "start.session": "Identifiant de la consultation",
    "start.session.help": "De 1 à 64 lettres, chiffres, _ ou -, par exemple celui du lien reçu.",
    "start.token": "Jeton d'accès (si le lien en contenait un)",
    "start.join": "Rejoindre",
    "call.title": "Consultation {session}",
    "call.remote": "Vidéo du {other}",
    "call.local": "Mon aperçu",
    "call.controls": "Commandes de l'appel",
    "call.mic.off": "Couper le micro",
    "call.mic.on": "Rétablir le micro",
    "call.camera.off": "Couper la caméra",
    "call.camera.on": "Rétablir la caméra",
    "call.hangup": "Raccrocher",
    "call.invite": "Lien pour le patient",
    "call.invite.copy": "Copier le lien",
    "call.invite.share": "Partager le lien",
    "call.invite.copied": "Lien copié",
    "call.invite.share-title": "Consultation e-PediCare",
    "call.chat": "Messages",
    "call.details": "Détails",
    "panel.close": "Fermer",
    "quality.none": "Qualité de l'appel : pas encore mesurée",
    "quality.good": "Qualité de l'appel : bonne",
    "quality.fair": "Qualité de l'appel : moyenne",
    "quality.poor": "Qualité de l'appel : mauvaise",
    "quality.text.none": "pas encore mesurée",
    "quality.text.good": "bonne",
    "quality.text.fair": "moyenne",
    "quality.text.poor": "mauvaise",
    "stats.path": "Chemin",
    "stats.quality": "Qualité",
    "stats.path.direct": "direct ({path})",
    "stats.path.relay": "par le serveur relais TURN ({path})",
    "check.title": "Vérification avant l'appel",
    "check.preview": "Aperçu de ma caméra",
    "check.camera.running": "Caméra : vérification…",
    "check.camera.ok": "Caméra : elle fonctionne",
    "check.camera.missing": "Caméra : aucune trouvée ; l'autre personne ne vous verra pas",
    "check.camera.denied": "Caméra et micro : accès refusé ; autorisez-les dans les réglages du navigateur",
    "check.camera.failed": "Caméra : elle n'a pas pu démarrer ; fermez les autres applications qui l'utilisent",
    "check.mic.running": "Micro : vérification…",
    "check.mic.ok": "Micro : il fonctionne (parlez : la barre bouge)",
    "check.mic.missing": "Micro : aucun trouvé ; l'autre personne ne vous entendra pas",
    "check.mic.denied": "Micro : accès refusé",
    "check.relay.running": "Serveur : vérification…",
    "check.relay.ok": "Serveur de consultation : joignable",
    "check.relay.down": "Serveur de consultation : injoignable",
    "check.relay.ws-blocked": "Serveur de consultation : joignable, mais la connexion d'appel est bloquée",
    "check.turn.idle": "Serveur relais (TURN)",
    "check.turn.running": "Serveur relais (TURN) : vérification…",
    "check.turn.ok": "Serveur relais (TURN) : joignable, relais obtenu",
    "check.turn.refused": "Serveur relais (TURN) : il refuse les identifiants",
    "check.turn.unreachable": "Serveur relais (TURN) : pas de réponse en {seconds} s",
    "check.verdict.turn-refused": "Le serveur relais (TURN) refuse les identifiants de la page : sur un réseau qui bloque les appels directs, l'appel échouera. Prévenez le cabinet.",
    "check.verdict.turn-unreachable": "Le serveur relais (TURN) ne répond pas depuis ce réseau : sur un réseau qui bloque les appels directs, l'appel échouera. Essayez un autre réseau ou prévenez le cabinet.",
    "check.verdict.running": "Vérification en cours…",
    "check.verdict.ok": "Tout est prêt : vous pouvez rejoindre la consultation.",
    "check.verdict.media": "Vous pouvez rejoindre, mais votre image ou votre son ne sera pas transmis (voir ci-dessus).",
    "check.verdict.relay-down": "Le serveur de consultation est injoignable : vérifiez votre connexion Internet, puis vérifiez à nouveau. Si cela persiste, prévenez le cabinet.",
    "check.verdict.ws-blocked": "Un pare-feu ou un proxy bloque la connexion d'appel (WebSocket) : essayez un autre réseau (par exemple les données mobiles) ou prévenez le cabinet.",
    "check.again": "Vérifier à nouveau",
    "check.camera.idle": "Caméra",
    "check.mic.idle": "Micro",
    "check.relay.idle": "Serveur de consultation",
    "check.verdict.idle": "Appuyez sur « Vérifier à nouveau » pour tester votre caméra, votre micro et la connexion.",
    "stats.title": "Détails techniques",
    "stats.in": "Reçu",
    "stats.out": "Envoyé",
    "stats.bitrate": "Débit",
    "stats.fps": "Images/s",
    "stats.size": "Résolution",
    "stats.rtt": "Aller-retour",
    "stats.lost": "Paquets perdus",
    "chat.title": "Messages",
    "chat.input": "Votre message",
    "chat.send": "Envoyer",
    "chat.me": "Moi",
    "chat.closed": "La messagerie s'ouvre quand l'appel est établi.",
    "chat.unavailable": "L'application du {other} n'a pas ouvert de messagerie : pas de messages pendant cet appel.",
    "other.patient": "patient",
    "other.practitioner": "praticien",
    "state.signaling": "Connexion au serveur…",
    "state.waiting": "En attente du {other}",
    "state.connecting": "Connexion en cours…",
    "state.connected": "Connexion directe",
    "state.connected-relay": "Via le serveur relais",
    "state.reconnecting": "Reconnexion au serveur…",
    "state.peer-away": "Le {other} a perdu la connexion au serveur ; l'appel continue",
    "state.left": "Le {other} a quitté l'appel",
    "state.peer-dropped": "Le {other} s'est déconnecté avant l'appel ; en attente de son retour",
    "state.failed": "La connexion avec le {other} a échoué",
    "state.recovering": "Connexion perdue, reconnexion… ({seconds} s)",
    "state.gave-up": "Connexion perdue avec le {other}",
    "call.gave-up": "La connexion avec le {other} n'a pas pu être rétablie en {seconds} s. Vous restez dans la consultation : l'appel reprendra si le {other} revient, ou rechargez la page.",
    "stats.recoveries": "Reconnexions",
    "state.ended": "Vous avez raccroché.",
    "media.denied": "L'accès à la caméra et au micro a été refusé. Autorisez-le dans les réglages du navigateur, puis rejoignez à nouveau.",
    "media.none": "Aucune caméra ni aucun micro n'a été trouvé : vous recevez l'image et le son de l'autre sans envoyer les vôtres.",
    "media.no-camera": "Aucune caméra n'a été trouvée : l'appel continue avec le son seulement.",
    "media.no-mic": "Aucun micro n'a été trouvé : l'appel continue avec l'image seulement.",
    "media.busy": "La caméra ou le micro est déjà utilisé par une autre application. Fermez-la, puis rejoignez à nouveau.",
    "media.insecure": "Ce navigateur ne donne accès à la caméra que sur une page sécurisée (https ou localhost).",
    "media.other": "La caméra ou le micro n'a pas pu démarrer ({name}).",
    "rtc.unsupported": "Ce navigateur ne prend pas en charge les appels vidéo (WebRTC).",
    "server.replaced": "Cette consultation a été reprise dans une autre fenêtre ; celle-ci s'arrête.",
    "server.unreachable": "Le serveur est injoignable ; nouvelle tentative dans {seconds} s.",
    "turn.refused": "Le serveur relais (TURN) refuse les identifiants donnés par le serveur de consultation : si l'appel direct est impossible, il échouera. Prévenez le cabinet.",
    "turn.unreachable": "Le serveur relais (TURN) ne répond pas depuis ce réseau (en {seconds} s) : si l'appel direct est impossible, il échouera.",
    "server.ws-blocked": "Le serveur répond, mais refuse ou ne reçoit pas la connexion d'appel (WebSocket, /ws) : un proxy ou un pare-feu la bloque, ou l'adresse du site n'est pas celle que le serveur attend. Prévenez le cabinet ; nouvelle tentative dans {seconds} s.",
    "error.bad-json": "Le serveur n'a pas compris un message de la page (JSON invalide).",
    "error.binary-frame": "Le serveur n'accepte pas les messages binaires.",
    "error.frame-too-large": "Un message était trop gros pour le serveur et n'a pas été transmis.",
    "error.missing-field": "Un message de la page était incomplet ; le serveur l'a refusé.",
    "error.bad-field": "Un message de la page contenait une valeur invalide ; le serveur l'a refusé.",
    "error.unknown-type": "Le serveur ne connaît pas ce type de message.",
    "error.not-joined": "La page a parlé au serveur avant d'avoir rejoint la consultation.",
    "error.already-joined": "Cette page a déjà rejoint une consultation.",
    "error.bad-session": "Identifiant de consultation invalide : de 1 à 64 lettres, chiffres, _ ou -.",
    "error.bad-role": "Rôle invalide : choisissez patient ou praticien.",
    "error.role-taken": "Quelqu'un occupe déjà la place du {role} dans cette consultation.",
    "error.bad-token": "Le jeton d'accès manque ou n'est pas valable pour cette consultation et ce rôle.",
    "error.token-expired": "Le jeton d'accès a expiré ; demandez un nouveau lien.",
    "error.token-not-yet-valid": "Ce lien n'ouvre la consultation qu'à l'heure du rendez-vous ; revenez à ce moment-là.",
    "error.not-practitioner": "Seul le praticien peut créer un lien d'invitation.",
    "error.no-peer": "Le {other} n'est pas connecté au serveur : un message n'a pas été transmis.",
    "error.rate-limited": "Trop de messages envoyés trop vite : le serveur en a ignoré un.",
    "error.server-full": "Le serveur est complet ; nouvelle tentative automatique.",
    "error.join-timeout": "La page a tardé à rejoindre la consultation ; nouvelle tentative.",
    "error.seat-held": "La place du {role} est gardée un moment pour la connexion qui vient de tomber ; nouvelle tentative automatique.",
    "error.address-limit": "Trop de connexions depuis ce réseau ; nouvelle tentative automatique.",
    "error.unavailable": "Le serveur est momentanément indisponible ; nouvelle tentative automatique.",
    "error.unknown": "Le serveur a refusé un message : {message}",
  },
  en: {
    "lang.switch": "Français",
    "lang.switch.label": "Passer en français",
    "start.title": "Join a consultation",
    "start.role": "I am",
    "role.patient": "a patient",
    "role.practitioner": "a practitioner",
    "start.session": "Consultation id",
    "start.session.help": "1 to 64 letters, digits, _ or -, for example the one in the link you received.",
    "start.token": "Access token (if the link had one)",
    "start.join": "Join",
    "call.title": "Consultation {session}",
    "call.remote": "The {other}'s video",
    "call.local": "My preview",
    "call.controls": "Call controls",
    "call.mic.off": "Mute microphone",
    "call.mic.on": "Unmute microphone",
    "call.camera.off": "Turn camera off",
    "call.camera.on": "Turn camera on",
    "call.hangup": "Hang up",
    "call.invite": "Link for the patient",
    "call.invite.copy": "Copy the link",
    "call.invite.share": "Share the link",
    "call.invite.copied": "Link copied",
    "call.invite.share-title": "e-PediCare consultation",
    "call.chat": "Messages",
    "call.details": "Details",
    "panel.close": "Close",
    "quality.none": "Call quality: not measured yet",
    "quality.good": "Call quality: good",
    "quality.fair": "Call quality: fair",
    "quality.poor": "Call quality: poor",
    "quality.text.none": "not measured yet",
    "quality.text.good": "good",
    "quality.text.fair": "fair",
    "quality.text.poor": "poor",
    "stats.path": "Path",
    "stats.quality": "Quality",
    "stats.path.direct": "direct ({path})",
    "stats.path.relay": "through the TURN relay server ({path})",
    "check.title": "Check before the call",
    "check.preview": "My camera's preview",
    "check.camera.running": "Camera: checking…",
    "check.camera.ok": "Camera: working",
    "check.camera.missing": "Camera: none found; the other person will not see you",
    "check.camera.denied": "Camera and microphone: access refused; allow them in the browser's settings",
    "check.camera.failed": "Camera: it could not start; close other applications that use it",
    "check.mic.running": "Microphone: checking…",
    "check.mic.ok": "Microphone: working (speak: the bar moves)",
    "check.mic.missing": "Microphone: none found; the other person will not hear you",
    "check.mic.denied": "Microphone: access refused",
    "check.relay.running": "Server: checking…",
    "check.relay.ok": "Consultation server: reachable",
    "check.relay.down": "Consultation server: unreachable",
    "check.relay.ws-blocked": "Consultation server: reachable, but the call connection is blocked",
    "check.turn.idle": "Relay server (TURN)",
    "check.turn.running": "Relay server (TURN): checking…",
    "check.turn.ok": "Relay server (TURN): reachable, relay obtained",
    "check.turn.refused": "Relay server (TURN): it refuses the credentials",
    "check.turn.unreachable": "Relay server (TURN): no answer within {seconds} s",
    "check.verdict.turn-refused": "The relay server (TURN) refuses the page's credentials: on a network that blocks direct calls, the call will fail. Tell the practice.",
    "check.verdict.turn-unreachable": "The relay server (TURN) does not answer from this network: on a network that blocks direct calls, the call will fail. Try another network or tell the practice.",
    "check.verdict.running": "Checking…",
    "check.verdict.ok": "Everything is ready: you can join the consultation.",
    "check.verdict.media": "You can join, but your picture or sound will not be sent (see above).",
    "check.verdict.relay-down": "The consultation server cannot be reached: check your Internet connection, then check again. If it goes on, tell the practice.",
    "check.verdict.ws-blocked": "A firewall or proxy blocks the call connection (WebSocket): try another network (mobile data, for example) or tell the practice.",
    "check.again": "Check again",
    "check.camera.idle": "Camera",
    "check.mic.idle": "Microphone",
    "check.relay.idle": "Consultation server",
    "check.verdict.idle": "Press “Check again” to test your camera, microphone and connection.",
    "stats.title": "Technical details",
    "stats.in": "Received",
    "stats.out": "Sent",
    "stats.bitrate": "Bitrate",
    "stats.fps": "Frames/s",
    "stats.size": "Resolution",
    "stats.rtt": "Round trip",
    "stats.lost": "Packets lost",
    "chat.title": "Messages",
    "chat.input": "Your message",
    "chat.send": "Send",
    "chat.me": "Me",
    "chat.closed": "Messages open once the call is connected.",
    "chat.unavailable": "The {other}'s app opened no message channel: no messages in this call.",
    "other.patient": "patient",
    "other.practitioner": "practitioner",
    "state.signaling": "Connecting to the server…",
    "state.waiting": "Waiting for the {other}",
    "state.connecting": "Connecting…",
    "state.connected": "Direct connection",
    "state.connected-relay": "Via the relay server",
    "state.reconnecting": "Reconnecting to the server…",
    "state.peer-away": "The {other} lost the connection to the server; the call goes on",
    "state.left": "The {other} left",
    "state.peer-dropped": "The {other} disconnected before the call; waiting for them to come back",
    "state.failed": "The connection with the {other} failed",
    "state.recovering": "Connection lost, reconnecting… ({seconds} s)",
    "state.gave-up": "Connection lost with the {other}",
    "call.gave-up": "The connection with the {other} could not be restored in {seconds} s. You are still in the consultation: the call resumes if the {other} comes back, or reload the page.",
    "stats.recoveries": "Reconnections",
    "state.ended": "You hung up.",
    "media.denied": "Access to the camera and microphone was refused. Allow it in the browser's settings, then join again.",
    "media.none": "No camera and no microphone were found: you receive the other side's picture and sound without sending yours.",
    "media.no-camera": "No camera was found: the call goes on with sound only.",
    "media.no-mic": "No microphone was found: the call goes on with the picture only.",
    "media.busy": "The camera or microphone is already in use by another application. Close it, then join again.",
    "media.insecure": "This browser gives access to the camera only on a secure page (https or localhost).",
    "media.other": "The camera or microphone could not start ({name}).",
    "rtc.unsupported": "This browser does not support video calls (WebRTC).",
    "server.replaced": "This consultation was taken over in another window; this one stops.",
    "server.unreachable": "The server cannot be reached; trying again in {seconds} s.",
    "turn.refused": "The relay server (TURN) refuses the credentials the consultation server gave: if a direct call is impossible, the call will fail. Tell the practice.",
    "turn.unreachable": "The relay server (TURN) does not answer from this network (within {seconds} s): if a direct call is impossible, the call will fail.",
    "server.ws-blocked": "The server answers, but refuses or never gets the call connection (WebSocket, /ws): a proxy or firewall blocks it, or the site's address is not the one the server expects. Tell the practice; trying again in {seconds} s.",
    "error.bad-json": "The server did not understand a message from the page (invalid JSON).",
    "error.binary-frame": "The server does not accept binary messages.",
    "error.frame-too-large": "A message was too large for the server and was not delivered.",
    "error.missing-field": "A message from the page was incomplete; the server refused it.",
    "error.bad-field": "A message from the page had an invalid value; the server refused it.",
    "error.unknown-type": "The server does not know this type of message.",
    "error.not-joined": "The page spoke to the server before joining the consultation.",
    "error.already-joined": "This page has already joined a consultation.",
    "error.bad-session": "Invalid consultation id: 1 to 64 letters, digits, _ or -.",
    "error.bad-role": "Invalid role: choose patient or practitioner.",
    "error.role-taken": "Someone already holds the {role}'s seat in this consultation.",
    "error.bad-token": "The access token is missing or not valid for this consultation and role.",
    "error.token-expired": "The access token has expired; ask for a new link.",
    "error.token-not-yet-valid": "This link opens the consultation only at the time of the appointment; come back then.",
    "error.not-practitioner": "Only the practitioner can create an invitation link.",
    "error.no-peer": "The {other} is not connected to the server: a message was not delivered.",
    "error.rate-limited": "Too many messages too fast: the server ignored one.",
    "error.server-full": "The server is full; trying again automatically.",
    "error.join-timeout": "The page took too long to join the consultation; trying again.",
    "error.seat-held": "The {role}'s seat is kept a moment for the connection that just dropped; trying again automatically.",
    "error.address-limit": "Too many connections from this network; trying again automatically.",
    "error.unavailable": "The server is briefly unavailable; trying again automatically.",
    "error.unknown": "The server refused a message: {message}",
  },
};

export const LANGUAGES = Object.keys(STRINGS);
const STORAGE_KEY = "epedicare.lang";
let current = "fr";

/** The language to start with: ?lang=, then the saved choice, then the browser's, then French. */
export function initialLanguage(params = new URLSearchParams(location.search)) {
  const wanted = [params.get("lang"), savedLanguage(), ...(navigator.languages || [navigator.language])];
  for (const tag of wanted) {
    const base = (tag || "").toLowerCase().split("-")[0];
    if (LANGUAGES.includes(base)) return base;
  }
  return "fr";
}

function savedLanguage() {
  try {
    return localStorage.getItem(STORAGE_KEY);
  } catch {
    return null; // storage disabled: no saved choice
  }
}

export function language() {
  return current;
}

export function setLanguage(lang, { save = false } = {}) {
  current = LANGUAGES.includes(lang) ? lang : "fr";
  document.documentElement.lang = current;
  if (save) {
    try {
      localStorage.setItem(STORAGE_KEY, current);
    } catch {
      // storage disabled: the choice lasts for this page only
    }
  }
  translatePage();
}

// Placeholders that name a role ({other}, {role}) are translated themselves.
const ROLE_PARAMS = new Set(["other", "role"]);

/** The string for key in the current language, with {name} placeholders filled in. */
export function t(key, params = {}) {
  const text = STRINGS[current][key] ?? STRINGS.fr[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (match, name) => {
    if (!(name in params)) return match;
    return ROLE_PARAMS.has(name) ? t(`other.${params[name]}`) : String(params[name]);
  });
}

/** Show a translated text in el, and keep it translated when the language changes. */
export function setText(el, key, params = {}) {
  el.dataset.i18n = key;
  el.dataset.i18nArgs = JSON.stringify(params);
  el.textContent = t(key, params);
}

export function hasKey(key) {
  return key in STRINGS.fr;
}

/** An element's accessible name, kept translated like setText. */
export function setLabel(el, key, params = {}) {
  el.dataset.i18nAriaLabel = key;
  el.dataset.i18nArgs = JSON.stringify(params);
  el.setAttribute("aria-label", t(key, params));
}

const ATTRIBUTES = { "aria-label": "i18nAriaLabel", placeholder: "i18nPlaceholder" };

/** Fill every [data-i18n] element's text and [data-i18n-<attribute>] attribute. */
export function translatePage(root = document) {
  const args = (el) => JSON.parse(el.dataset.i18nArgs || "{}");
  for (const el of root.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n, args(el));
  }
  for (const [attr, data] of Object.entries(ATTRIBUTES)) {
    for (const el of root.querySelectorAll(`[data-i18n-${attr}]`)) {
      el.setAttribute(attr, t(el.dataset[data], args(el)));
    }
  }
}
