/*
 * proxyd's PAC helper library: the functions a PAC file may call, written for proxyd.
 *
 * How it is used (see proxyd/routing/pac/engine.py): this file is one function expression.
 * The engine evaluates it in a fresh QuickJS context and calls it with the local addresses
 * (myIpAddress, myIpAddressEx answers, computed once in Python). It installs the helpers on the
 * global object *before* the PAC script runs, so a script that defines its own copy of a helper
 * wins, as in browsers. It returns `bind(entry)`, which wraps the script's FindProxyForURLEx or
 * FindProxyForURL into the one function Python calls per evaluation:
 *
 *     evaluate(url, host, nowMs, utcOffsetMinutes, answersJson) -> JSON text
 *         {"result": "PROXY a:3128; DIRECT" | null, "type": typeof result, "alerts": [...]}
 *      or {"missing": ["name", ...], "alerts": [...]}
 *
 * Nothing here calls into Python (the binding forbids it while a time limit is set), so:
 *
 * - DNS (dnsResolve, dnsResolveEx, isResolvable, isResolvableEx, isInNet, isInNetEx on names)
 *   reads `answersJson`, the answers Python resolved before this evaluation. An unknown name is
 *   recorded in `missing` and aborts the script with a NeedsDns error; even if the script catches
 *   that error, the result is discarded. Python resolves the missing names with proxyd's resolver
 *   and evaluates again with the bigger table (a bounded number of rounds). This is Chromium's
 *   "non-blocking DNS" PAC mode (ProxyResolverV8Tracing: abort on a DNS miss, resolve, restart).
 * - Time (weekdayRange, dateRange, timeRange, and `new Date()` / `Date.now()` in the script)
 *   reads `nowMs` (epoch milliseconds) and `utcOffsetMinutes` (the local zone's offset at that
 *   instant); "GMT" as the last argument uses UTC. Evaluation is deterministic for given inputs.
 *
 * Semantics follow the Netscape PAC definition as implemented by Mozilla and Chromium
 * (netwerk/base/ProxyAutoConfig.cpp, services/proxy_resolver/pac_js_library.h) and Microsoft's
 * IPv6 extensions ("IPv6 extensions to Navigator Auto-Config File Format"): comparisons are
 * case-sensitive, dnsResolve and myIpAddress are IPv4-only, the *Ex functions return
 * semicolon-separated lists of IPv4 and IPv6 addresses, ranges whose start is after their end wrap
 * around (FRI..MON, NOV..FEB, 22:00..06:00), except the two-argument timeRange(h1, h2), which is
 * `h1 <= hour <= h2` exactly as in both browsers.
 */
(function (myIpAddressAnswer, myIpAddressExAnswer) {
  "use strict";

  var global = globalThis;
  var RealDate = Date;
  var hasOwn = Object.prototype.hasOwnProperty;
  var state = { nowMs: 0, offsetMs: 0, answers: {}, missing: [], alerts: [] };

  /* ---- addresses --------------------------------------------------------------------- */

  // "a.b.c.d" with decimal parts 0..255 -> [a, b, c, d], or null.
  function parseIPv4(text) {
    var match = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(text);
    if (match === null) return null;
    var parts = [];
    for (var i = 1; i <= 4; i++) {
      var n = parseInt(match[i], 10);
      if (n > 255) return null;
      parts.push(n);
    }
    return parts;
  }

  // RFC 4291 §2.2 text forms (with "::" and a trailing dotted IPv4) -> 8 16-bit groups, or null.
  function parseIPv6(text) {
    text = String(text);
    if (text.indexOf(":") < 0 || /[^0-9a-fA-F:.]/.test(text)) return null;
    var tail = [];
    var lastColon = text.lastIndexOf(":");
    if (text.indexOf(".", lastColon) >= 0) {
      // A trailing dotted IPv4 ("::ffff:192.0.2.1") is the last two groups.
      var v4 = parseIPv4(text.slice(lastColon + 1));
      if (v4 === null) return null;
      tail = [(v4[0] << 8) | v4[1], (v4[2] << 8) | v4[3]];
      var prefix = text.slice(0, lastColon + 1);
      text = prefix.slice(-2) === "::" ? prefix : prefix.slice(0, -1);
    }
    var halves = text.split("::");
    if (halves.length > 2) return null;
    function groups(part) {
      if (part === "") return [];
      var out = [];
      var items = part.split(":");
      for (var i = 0; i < items.length; i++) {
        if (!/^[0-9a-fA-F]{1,4}$/.test(items[i])) return null;
        out.push(parseInt(items[i], 16));
      }
      return out;
    }
    var head = groups(halves[0]);
    if (head === null) return null;
    if (halves.length === 1) {
      var all = head.concat(tail);
      return all.length === 8 ? all : null;
    }
    var rest = groups(halves[1]);
    if (rest === null) return null;
    rest = rest.concat(tail);
    var fill = 8 - head.length - rest.length;
    if (fill < 1) return null;
    var result = head.slice();
    for (var k = 0; k < fill; k++) result.push(0);
    return result.concat(rest);
  }

  // Either family -> {v: 4|6, bits: [groups of 8 (v4) or 16 (v6) bits]} or null.
  function parseIP(text) {
    text = String(text).trim();
    if (text.charAt(0) === "[" && text.charAt(text.length - 1) === "]") text = text.slice(1, -1);
    var v4 = parseIPv4(text);
    if (v4 !== null) return { v: 4, bits: v4, width: 8 };
    var v6 = parseIPv6(text);
    if (v6 !== null) return { v: 6, bits: v6, width: 16 };
    return null;
  }

  function compareIP(a, b) {
    for (var i = 0; i < a.bits.length; i++) {
      if (a.bits[i] !== b.bits[i]) return a.bits[i] - b.bits[i];
    }
    return 0;
  }

  // The first `length` bits of both addresses are equal.
  function samePrefix(address, network, length) {
    for (var i = 0; i < address.bits.length && length > 0; i++) {
      var take = Math.min(address.width, length);
      var shift = address.width - take;
      if (address.bits[i] >> shift !== network.bits[i] >> shift) return false;
      length -= take;
    }
    return true;
  }

  /* ---- DNS: answers injected by Python, misses recorded (see the header) -------------- */

  function NeedsDns(host) {
    this.name = "NeedsDns";
    this.host = host;
    this.message = "proxyd: no DNS answer yet for " + host;
  }
  NeedsDns.prototype = Object.create(Error.prototype);
  NeedsDns.prototype.constructor = NeedsDns;

  // All addresses of `host` (IP literals answer themselves), [] when it has none.
  function lookup(host) {
    if (host === null || host === undefined) return []; // dnsResolve(dnsResolve(x)) after a miss
    var name = String(host).trim().toLowerCase();
    if (name === "") return [];
    var literal = parseIP(name);
    if (literal !== null) return [name.charAt(0) === "[" ? name.slice(1, -1) : name];
    if (hasOwn.call(state.answers, name)) return state.answers[name];
    if (state.missing.indexOf(name) < 0) state.missing.push(name);
    throw new NeedsDns(name);
  }

  function dnsResolve(host) {
    var addresses = lookup(host);
    for (var i = 0; i < addresses.length; i++) {
      if (parseIPv4(addresses[i]) !== null) return addresses[i];
    }
    return null; // Chromium and Mozilla: dnsResolve is IPv4-only and null on failure
  }

  function dnsResolveEx(host) {
    var addresses = lookup(host);
    var seen = [];
    for (var i = 0; i < addresses.length; i++) {
      if (seen.indexOf(addresses[i]) < 0) seen.push(addresses[i]);
    }
    return seen.join(";"); // Microsoft: "" when the name does not resolve
  }

  function isResolvable(host) {
    return dnsResolve(host) !== null;
  }

  function isResolvableEx(host) {
    return dnsResolveEx(host) !== "";
  }

  function myIpAddress() {
    return myIpAddressAnswer;
  }

  function myIpAddressEx() {
    return myIpAddressExAnswer;
  }

  /* ---- host name helpers (Netscape / Mozilla semantics) ------------------------------- */

  function isPlainHostName(host) {
    host = String(host);
    // Chromium: an IPv6 literal has no dot but is not a plain host name.
    return host.indexOf(".") < 0 && parseIPv6(host) === null;
  }

  function dnsDomainIs(host, domain) {
    host = String(host);
    domain = String(domain);
    return host.length >= domain.length && host.substring(host.length - domain.length) === domain;
  }

  function localHostOrDomainIs(host, hostdom) {
    host = String(host);
    hostdom = String(hostdom);
    return host === hostdom || hostdom.lastIndexOf(host + ".", 0) === 0;
  }

  function dnsDomainLevels(host) {
    return String(host).split(".").length - 1;
  }

  var shExpCache = {};
  var shExpCacheSize = 0;

  function shExpRegex(shexp, classes) {
    var special = classes ? /[.+^${}()|\\\/]/g : /[.+^${}()|[\]\\\/]/g;
    var source = shexp.replace(special, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
    return new RegExp("^" + source + "$");
  }

  // Shell expression: "*" any run of characters, "?" one character, "[...]" a character class
  // (literal when unbalanced), everything else literal; case-sensitive like Mozilla and Chromium.
  function shExpMatch(str, shexp) {
    shexp = String(shexp);
    var regex = hasOwn.call(shExpCache, shexp) ? shExpCache[shexp] : null;
    if (regex === null) {
      try {
        regex = shExpRegex(shexp, true);
      } catch (e) {
        regex = shExpRegex(shexp, false);
      }
      if (shExpCacheSize >= 512) {
        shExpCache = {};
        shExpCacheSize = 0;
      }
      shExpCache[shexp] = regex;
      shExpCacheSize++;
    }
    return regex.test(String(str));
  }

  function isInNet(host, pattern, mask) {
    var patternParts = parseIPv4(String(pattern));
    var maskParts = parseIPv4(String(mask));
    if (patternParts === null || maskParts === null) return false;
    var address = parseIPv4(String(host));
    if (address === null) {
      var resolved = dnsResolve(host);
      if (resolved === null) return false;
      address = parseIPv4(resolved);
    }
    for (var i = 0; i < 4; i++) {
      if ((address[i] & maskParts[i]) !== (patternParts[i] & maskParts[i])) return false;
    }
    return true;
  }

  // Microsoft: isInNetEx(addresses, prefixes); both may be ";"-separated lists, an address may
  // be a host name (resolved like dnsResolveEx), a prefix is "address/length" of either family.
  function isInNetEx(addresses, prefixes) {
    var networks = [];
    var items = String(prefixes).split(";");
    for (var i = 0; i < items.length; i++) {
      var slash = items[i].indexOf("/");
      if (slash < 0) continue;
      var network = parseIP(items[i].slice(0, slash));
      var lengthText = items[i].slice(slash + 1).trim();
      if (network === null || !/^\d{1,3}$/.test(lengthText)) continue;
      var length = parseInt(lengthText, 10);
      if (length > network.bits.length * network.width) continue;
      networks.push({ net: network, length: length });
    }
    var hosts = String(addresses).split(";");
    for (var h = 0; h < hosts.length; h++) {
      var text = hosts[h].trim();
      if (text === "") continue;
      var candidates = parseIP(text) !== null ? [text] : lookup(text);
      for (var c = 0; c < candidates.length; c++) {
        var address = parseIP(candidates[c]);
        if (address === null) continue;
        for (var n = 0; n < networks.length; n++) {
          var entry = networks[n];
          if (entry.net.v === address.v && samePrefix(address, entry.net, entry.length)) return true;
        }
      }
    }
    return false;
  }

  // Microsoft / Chromium: IPv6 addresses first, then IPv4, each in ascending order; false when
  // the list is empty or an item is not an IP address.
  function sortIpAddressList(list) {
    var items = String(list).split(";");
    var parsed = [];
    for (var i = 0; i < items.length; i++) {
      var text = items[i].trim();
      var address = parseIP(text);
      if (text === "" || address === null) return false;
      parsed.push({ text: text, address: address });
    }
    parsed.sort(function (a, b) {
      if (a.address.v !== b.address.v) return b.address.v - a.address.v;
      return compareIP(a.address, b.address);
    });
    return parsed
      .map(function (item) {
        return item.text;
      })
      .join(";");
  }

  function getClientVersion() {
    return "1.0";
  }

  /* ---- time: the injected "now" ------------------------------------------------------- */

  var WEEKDAYS = { SUN: 0, MON: 1, TUE: 2, WED: 3, THU: 4, FRI: 5, SAT: 6 };
  var MONTHS = { JAN: 0, FEB: 1, MAR: 2, APR: 3, MAY: 4, JUN: 5, JUL: 6, AUG: 7, SEP: 8, OCT: 9, NOV: 10, DEC: 11 };

  // The calendar fields of "now", local (the injected offset) or GMT.
  function now(gmt) {
    var d = new RealDate(state.nowMs + (gmt ? 0 : state.offsetMs));
    return {
      year: d.getUTCFullYear(),
      month: d.getUTCMonth(),
      day: d.getUTCDate(),
      weekday: d.getUTCDay(),
      seconds: d.getUTCHours() * 3600 + d.getUTCMinutes() * 60 + d.getUTCSeconds(),
      hour: d.getUTCHours(),
    };
  }

  // Arguments without a trailing "GMT", and whether it was there.
  function splitGmt(args) {
    var list = Array.prototype.slice.call(args);
    var gmt = list.length > 0 && list[list.length - 1] == "GMT";
    if (gmt) list.pop();
    return { list: list, gmt: gmt };
  }

  // Inclusive range; a start after the end wraps around (FRI..MON).
  function within(value, start, end) {
    return start <= end ? start <= value && value <= end : value >= start || value <= end;
  }

  function weekdayRange() {
    var a = splitGmt(arguments);
    if (a.list.length < 1) return false;
    // As in Mozilla and Chromium: wd2 counts only in the two-argument form.
    var first = hasOwn.call(WEEKDAYS, a.list[0]) ? WEEKDAYS[a.list[0]] : -1;
    var last = a.list.length === 2 ? (hasOwn.call(WEEKDAYS, a.list[1]) ? WEEKDAYS[a.list[1]] : -1) : first;
    if (first < 0 || last < 0) return false;
    return within(now(a.gmt).weekday, first, last);
  }

  // A dateRange argument: a month name (M), a day of the month 1..31 (D) or a year > 31 (Y).
  function dateField(value) {
    if (typeof value === "string" && hasOwn.call(MONTHS, value)) return { kind: "M", n: MONTHS[value] };
    var n = typeof value === "number" ? Math.floor(value) : parseInt(value, 10);
    if (isNaN(n) || n < 1) return null;
    return n <= 31 ? { kind: "D", n: n } : { kind: "Y", n: n };
  }

  function dateRange() {
    var a = splitGmt(arguments);
    var fields = [];
    var kinds = "";
    for (var i = 0; i < a.list.length; i++) {
      var field = dateField(a.list[i]);
      if (field === null) return false;
      fields.push(field.n);
      kinds += field.kind;
    }
    var t = now(a.gmt);
    var f = fields;
    switch (kinds) {
      case "D":
        return t.day === f[0];
      case "M":
        return t.month === f[0];
      case "Y":
        return t.year === f[0];
      case "DD":
        return within(t.day, f[0], f[1]);
      case "MM":
        return within(t.month, f[0], f[1]);
      case "YY":
        return within(t.year, f[0], f[1]);
      case "DMDM": // day1 month1 day2 month2
        return within(t.month * 32 + t.day, f[1] * 32 + f[0], f[3] * 32 + f[2]);
      case "MYMY": // month1 year1 month2 year2
        return within(t.year * 12 + t.month, f[1] * 12 + f[0], f[3] * 12 + f[2]);
      case "DMYDMY": // day1 month1 year1 day2 month2 year2
        return within(
          (t.year * 12 + t.month) * 32 + t.day,
          (f[2] * 12 + f[1]) * 32 + f[0],
          (f[5] * 12 + f[4]) * 32 + f[3]
        );
      default:
        return false;
    }
  }

  function timeRange() {
    var a = splitGmt(arguments);
    var n = [];
    for (var i = 0; i < a.list.length; i++) {
      n.push(Number(a.list[i]));
      if (isNaN(n[i])) return false;
    }
    var t = now(a.gmt);
    switch (n.length) {
      case 1:
        return t.hour === n[0];
      case 2: // as in Mozilla and Chromium: inclusive hours, no wrap-around
        return n[0] <= t.hour && t.hour <= n[1];
      case 4: // hour1 min1 hour2 min2: to the end of the last minute
        return within(t.seconds, n[0] * 3600 + n[1] * 60, n[2] * 3600 + n[3] * 60 + 59);
      case 6: // hour1 min1 sec1 hour2 min2 sec2
        return within(t.seconds, n[0] * 3600 + n[1] * 60 + n[2], n[3] * 3600 + n[4] * 60 + n[5]);
      default:
        return false;
    }
  }

  // `new Date()` and `Date.now()` in the script see the injected "now" too.
  function PacDate() {
    if (!new.target) return new RealDate(state.nowMs).toString();
    if (arguments.length === 0) return new RealDate(state.nowMs);
    return Reflect.construct(RealDate, arguments);
  }
  PacDate.prototype = RealDate.prototype;
  PacDate.now = function () {
    return state.nowMs;
  };
  PacDate.parse = RealDate.parse;
  PacDate.UTC = RealDate.UTC;

  function alert(message) {
    if (state.alerts.length < 16) state.alerts.push(String(message).slice(0, 200));
  }

  var helpers = {
    isPlainHostName: isPlainHostName,
    dnsDomainIs: dnsDomainIs,
    localHostOrDomainIs: localHostOrDomainIs,
    isResolvable: isResolvable,
    isInNet: isInNet,
    dnsResolve: dnsResolve,
    myIpAddress: myIpAddress,
    dnsDomainLevels: dnsDomainLevels,
    shExpMatch: shExpMatch,
    weekdayRange: weekdayRange,
    dateRange: dateRange,
    timeRange: timeRange,
    isResolvableEx: isResolvableEx,
    isInNetEx: isInNetEx,
    dnsResolveEx: dnsResolveEx,
    myIpAddressEx: myIpAddressEx,
    sortIpAddressList: sortIpAddressList,
    getClientVersion: getClientVersion,
    alert: alert,
    Date: PacDate,
  };
  for (var name in helpers) {
    if (hasOwn.call(helpers, name)) global[name] = helpers[name];
  }

  return function bind(entry) {
    return function evaluate(url, host, nowMs, utcOffsetMinutes, answersJson) {
      state.nowMs = nowMs;
      state.offsetMs = utcOffsetMinutes * 60000;
      state.answers = answersJson ? JSON.parse(answersJson) : {};
      state.missing = [];
      state.alerts = [];
      var result;
      var failure = null;
      try {
        result = entry(url, host);
      } catch (e) {
        failure = e;
      }
      if (state.missing.length > 0) {
        return JSON.stringify({ missing: state.missing, alerts: state.alerts });
      }
      if (failure !== null) throw failure;
      return JSON.stringify({
        result: typeof result === "string" ? result : null,
        type: typeof result,
        alerts: state.alerts,
      });
    };
  };
});
