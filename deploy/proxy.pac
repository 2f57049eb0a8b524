// The PAC file proxyd serves to browsers at http://ADMIN/proxy.pac (admin.proxy_pac).
// Point a browser's "automatic proxy configuration URL" at it. Edit the PROXY address to the one
// your clients reach proxyd at; proxyd re-reads this file on every request.
function FindProxyForURL(url, host) {
  // Names without a dot and *.local go direct.
  if (isPlainHostName(host) || shExpMatch(host, "*.local")) {
    return "DIRECT";
  }
  // IPv4 literals on loopback or the private ranges go direct. Only literals are tested, so the
  // browser never waits for a DNS lookup (isInNet on a name would resolve it).
  if (/^\d+\.\d+\.\d+\.\d+$/.test(host) &&
      (isInNet(host, "127.0.0.0", "255.0.0.0") ||
       isInNet(host, "10.0.0.0", "255.0.0.0") ||
       isInNet(host, "172.16.0.0", "255.240.0.0") ||
       isInNet(host, "192.168.0.0", "255.255.0.0"))) {
    return "DIRECT";
  }
  return "PROXY 127.0.0.1:3128; DIRECT";
}
